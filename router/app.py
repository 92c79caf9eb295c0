"""The OpenAI-compatible router: validate, admit, pick a worker, proxy (streaming as it arrives), retry.

It is cache-oblivious by default: with a shared pool every worker can reuse every prefix, so the router
balances load only. It never imports the pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

import aiohttp
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect

from beluga.router import errors, limits, policies, tenants
from beluga.router.errors import ApiError
from beluga.router.registry import Registry, Worker, dns_source, ray_source, static_source
from beluga.router.schemas import ChatRequest, CompletionRequest
from beluga.router.settings import RouterSettings

log = logging.getLogger(__name__)
JSON = {"content-type": "application/json"}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("beluga_router_requests", "requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("beluga_router_latency_seconds", "time to the response's end", ["route"],
                                 registry=r, buckets=(.005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttfb = Histogram("beluga_router_first_byte_seconds", "time to the worker's first byte", ["route"],
                              registry=r, buckets=(.005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.in_flight = Gauge("beluga_router_in_flight", "requests in flight per worker", ["worker"], registry=r)
        self.retries = Counter("beluga_router_retries", "requests retried on another worker", registry=r)
        self.decisions = Counter("beluga_router_decisions", "worker chosen", ["policy", "worker"], registry=r)
        self.rejected = Counter("beluga_router_rejected", "requests refused by admission control", registry=r)


def _source(s: RouterSettings):
    if s.discovery == "static":
        return static_source(s.workers)
    if s.discovery == "dns":
        if not s.dns_name:
            raise ValueError("dns discovery needs --dns-name (the workers' headless service)")
        return dns_source(s.dns_name, s.dns_port)
    if s.discovery == "ray":
        return ray_source(s.ray_address)
    raise ValueError(f"unknown discovery {s.discovery!r}: static, dns or ray")


def create_app(settings: RouterSettings) -> FastAPI:
    """The router as an ASGI app. Raises ValueError on settings it cannot run with (a key file it cannot
    read, an unknown policy or discovery): it never starts half-configured."""
    policy = policies.make(settings.policy)
    auth = tenants.Auth(*tenants.load(settings))
    worker_key = tenants.worker_key(settings)
    source = _source(settings)
    metrics = Metrics()
    state: dict = {"active": 0}
    gate = asyncio.Semaphore(settings.max_in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # aiohttp, not httpx, on the hot path: it proxies several times more requests per core. The workers'
        # key rides on the session, so every upstream request carries it (proxied calls, health, models).
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_in_flight * 2, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=settings.request_timeout_s, sock_connect=settings.connect_timeout_s),
            auto_decompress=False, headers={"Authorization": f"Bearer {worker_key}"} if worker_key else None)
        registry = Registry(source, client, settings.health_interval_s)
        await registry.refresh()
        registry.start()
        state.update(client=client, registry=registry)
        yield
        await registry.stop()
        await client.close()

    app = FastAPI(title="Beluga-KV router", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    app.add_middleware(limits.BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.openapi = lambda: _openapi(app, {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest})

    @app.get("/health")
    async def health():
        """Open to all (probes): says only whether a worker is up."""
        ok = bool(state["registry"].healthy())
        return JSONResponse({"status": "ok" if ok else "no healthy worker"}, status_code=200 if ok else 503)

    @app.get("/workers")
    async def workers(request: Request):
        auth.tenant(request, admin_ok=True)
        return [w.view() for w in state["registry"].workers.values()]

    @app.get("/v1/models")
    async def models(request: Request):
        auth.tenant(request, admin_ok=True)
        names = sorted(state["registry"].models())
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "beluga"} for n in names]}

    @app.get("/metrics")
    async def prom(request: Request):
        auth.tenant(request, admin_ok=True)
        for w in state["registry"].workers.values():
            metrics.in_flight.labels(w.url).set(w.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def handle(request: Request, route: str, schema: type[BaseModel]) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await _handle(request, route, schema)
        except ApiError as e:
            resp = errors.response(e.status, e.message, e.code, e.param)
        if not isinstance(resp, StreamingResponse):
            metrics.requests.labels(route, str(resp.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return resp

    async def _handle(request: Request, route: str, schema: type[ChatRequest | CompletionRequest]) -> Response:
        tenant = auth.tenant(request)  # before the body: no one without a key makes the router read one
        body = await _read_json(request)
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            raise errors.from_validation(e.errors(), body) from None
        prompt = req.prompt_text()
        if len(prompt) > settings.max_prompt_chars:
            raise ApiError(400, f"Prompt over {settings.max_prompt_chars} characters.", "prompt_too_long", "prompt")
        registry: Registry = state["registry"]
        known = registry.models()
        if known and req.model not in known:
            raise ApiError(404, f"The model '{req.model}' does not exist; served: {sorted(known)}.",
                           "model_not_found", "model")
        if tenant is not None:
            body["cache_salt"] = tenants.salt(tenant, req.cache_salt)
        try:
            raw = json.dumps(body, allow_nan=False).encode()
        except ValueError:  # 1e999 parses as infinity
            raise ApiError(400, "Every number must be finite.", "invalid_request") from None
        if state["active"] >= settings.max_in_flight + settings.max_queue:
            metrics.rejected.inc()
            raise ApiError(429, "Too many requests in flight; retry later.", "rate_limited")
        facts = policies.RequestFacts(prompt[: settings.affinity_prefix_chars], len(prompt) // 4)
        show_worker = settings.worker_header or request.headers.get("x-beluga-debug") == "1"
        state["active"] += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                state["active"] -= 1
                gate.release()

        try:
            await gate.acquire()
        except BaseException:
            state["active"] -= 1
            raise
        try:
            resp = await _proxy(route, raw, req.stream, facts, release, show_worker)
        except BaseException:
            release()
            raise
        if not isinstance(resp, StreamingResponse):
            release()
        return resp

    async def _proxy(route: str, raw: bytes, stream: bool, facts, release, show_worker: bool) -> Response:
        registry: Registry = state["registry"]
        client: aiohttp.ClientSession = state["client"]
        tried: set[str] = set()
        last_error = "no healthy worker"
        t0 = time.perf_counter()
        for attempt in range(settings.max_retries + 1):
            candidates = [w for w in registry.healthy() if w.url not in tried]
            if not candidates:
                break
            w = policy.choose(candidates, facts)
            tried.add(w.url)
            metrics.decisions.labels(policy.name, w.url).inc()
            if attempt:
                metrics.retries.inc()
            _begin(w, facts)
            try:
                up = await client.post(w.url + route, data=raw, headers=JSON)
            except (TimeoutError, aiohttp.ClientError) as e:
                _end(w, facts)
                registry.eject(w, f"{type(e).__name__}: {e}")
                last_error = f"worker {w.url} unreachable ({type(e).__name__})"
                continue
            if up.status >= 500 or up.status in (401, 403):  # 401/403: the router's worker key is wrong
                up.release()
                _end(w, facts)
                last_error = f"worker {w.url} answered {up.status}"
                if up.status < 500:
                    log.error("worker %s refused the router's worker key (%s)", w.url, up.status)
                continue
            metrics.ttfb.labels(route).observe(time.perf_counter() - t0)
            headers = {"x-beluga-worker": w.url} if show_worker else None
            if not stream or up.status != 200:
                try:
                    content = await up.read()
                except (TimeoutError, aiohttp.ClientError) as e:
                    return errors.response(502, f"A worker failed while answering: {type(e).__name__}.",
                                           "upstream_failed")
                finally:
                    up.release()
                    _end(w, facts)
                return Response(content, status_code=up.status,
                                media_type=up.headers.get("content-type", "application/json"), headers=headers)
            return StreamingResponse(_relay(up, w, facts, route, t0, release), media_type="text/event-stream",
                                     headers=headers)
        log.warning("no worker could serve a request: %s", last_error)
        if "no healthy" in last_error:
            return errors.response(503, "No worker is available; retry later.", "upstream_unavailable")
        return errors.response(502, "No worker could serve the request.", "upstream_unavailable")

    async def _relay(up: aiohttp.ClientResponse, w: Worker, facts, route: str, t0: float, release):
        status = "200"
        try:
            async for chunk in up.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as e:
            status = "502"
            log.warning("worker %s failed mid-stream: %s", w.url, e)
            state["registry"].eject(w, "failed mid-stream")
            yield errors.sse_event(502, f"The worker failed mid-stream ({type(e).__name__}); the answer is "
                                        "incomplete.", "upstream_failed")
        finally:
            up.release()
            _end(w, facts)
            release()
            metrics.requests.labels(route, status).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - t0)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "/v1/chat/completions", ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions", CompletionRequest)

    return app


async def _read_json(request: Request) -> dict:
    """The body, read through `limits.BodyLimits` (which stops it at the size limit and the deadline), parsed
    by pydantic's JSON parser: it refuses invalid UTF-8, NaN and Infinity, and nesting deeper than 200 (a
    RecursionError in the stdlib parser was a 500)."""
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
    except ClientDisconnect:
        raise ApiError(400, "The client left before its request body arrived.", "client_disconnected") from None
    try:
        body = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise ApiError(400, f"Request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", "invalid_request")
    return body


def _openapi(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> dict:
    """FastAPI's document, plus the request bodies (the routes read their bodies themselves, through the
    limits, so FastAPI does not know them): clients and the fuzzer in the tests see the accepted shapes."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        names, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                         ref_template="#/components/schemas/{model}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for path, model in bodies.items():
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": names[(model, "validation")]}}}
        app.openapi_schema = doc
    return app.openapi_schema


def _begin(w: Worker, facts) -> None:
    w.in_flight += 1
    w.in_flight_tokens += facts.tokens


def _end(w: Worker, facts) -> None:
    w.in_flight -= 1
    w.in_flight_tokens -= facts.tokens
