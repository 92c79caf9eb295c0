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
from pathlib import Path

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from beluga.router import errors, policies
from beluga.router.registry import Registry, Worker, dns_source, ray_source, static_source
from beluga.router.settings import RouterSettings

log = logging.getLogger(__name__)
JSON = {"content-type": "application/json"}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    cache_salt: str | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    max_tokens: int | None = Field(None, ge=0)
    cache_salt: str | None = None


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


def _api_keys(s: RouterSettings) -> dict[str, str]:
    keys = dict(s.api_keys)
    if s.api_keys_file:
        for line in Path(s.api_keys_file).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                keys[parts[0]] = parts[1]
    return keys


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
    policy = policies.make(settings.policy)
    keys = _api_keys(settings)
    source = _source(settings)
    metrics = Metrics()
    state: dict = {"active": 0}
    gate = asyncio.Semaphore(settings.max_in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # aiohttp, not httpx, on the hot path: it proxies several times more requests per core.
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_in_flight * 2, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=settings.request_timeout_s, sock_connect=settings.connect_timeout_s),
            auto_decompress=False)
        registry = Registry(source, client, settings.health_interval_s)
        await registry.refresh()
        registry.start()
        state.update(client=client, registry=registry)
        yield
        await registry.stop()
        await client.close()

    app = FastAPI(title="Beluga-KV router", lifespan=lifespan)

    @app.get("/health")
    async def health():
        ok = bool(state["registry"].healthy())
        return JSONResponse({"status": "ok" if ok else "no healthy worker"}, status_code=200 if ok else 503)

    @app.get("/workers")
    async def workers():
        return [w.view() for w in state["registry"].workers.values()]

    @app.get("/v1/models")
    async def models():
        names = sorted(state["registry"].models())
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "beluga"} for n in names]}

    @app.get("/metrics")
    async def prom():
        for w in state["registry"].workers.values():
            metrics.in_flight.labels(w.url).set(w.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def handle(request: Request, route: str, schema: type[BaseModel]) -> Response:
        t0 = time.perf_counter()
        resp = await _handle(request, route, schema)
        if not isinstance(resp, StreamingResponse):
            metrics.requests.labels(route, str(resp.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return resp

    async def _handle(request: Request, route: str, schema: type[BaseModel]) -> Response:
        tenant = None
        if keys:
            auth = request.headers.get("authorization", "")
            tenant = keys.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None
            if tenant is None:
                return errors.response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                                       "invalid_api_key")
        if int(request.headers.get("content-length") or 0) > settings.max_body_bytes:
            return errors.response(413, f"Request body over {settings.max_body_bytes} bytes.", "body_too_large")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            return errors.response(413, f"Request body over {settings.max_body_bytes} bytes.", "body_too_large")
        try:
            body = json.loads(raw)
            req = schema.model_validate(body)
        except json.JSONDecodeError as e:
            return errors.response(400, f"Request body is not valid JSON: {e}", "invalid_json")
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"])
            return errors.response(400, f"{param}: {err['msg']}", "invalid_request", param)
        prompt = _prompt_text(body)
        if len(prompt) > settings.max_prompt_chars:
            return errors.response(400, f"Prompt over {settings.max_prompt_chars} characters.", "prompt_too_long",
                                   "prompt")
        registry: Registry = state["registry"]
        known = registry.models()
        if known and req.model not in known:
            return errors.response(404, f"The model '{req.model}' does not exist; served: {sorted(known)}.",
                                   "model_not_found", "model")
        if tenant is not None:
            body["cache_salt"] = f"{tenant}:{body['cache_salt']}" if body.get("cache_salt") else tenant
            raw = json.dumps(body).encode()
        if state["active"] >= settings.max_in_flight + settings.max_queue:
            metrics.rejected.inc()
            return errors.response(429, "Too many requests in flight; retry later.", "rate_limited")
        facts = policies.RequestFacts(prompt[: settings.affinity_prefix_chars], len(prompt) // 4)
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
            resp = await _proxy(route, raw, req.stream, facts, release)
        except BaseException:
            release()
            raise
        if not isinstance(resp, StreamingResponse):
            release()
        return resp

    async def _proxy(route: str, raw: bytes, stream: bool, facts, release) -> Response:
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
            if up.status >= 500:
                up.release()
                _end(w, facts)
                last_error = f"worker {w.url} answered {up.status}"
                continue
            metrics.ttfb.labels(route).observe(time.perf_counter() - t0)
            if not stream or up.status != 200:
                try:
                    content = await up.read()
                except (TimeoutError, aiohttp.ClientError) as e:
                    return errors.response(502, f"Worker {w.url} failed while answering: {type(e).__name__}.",
                                           "upstream_failed")
                finally:
                    up.release()
                    _end(w, facts)
                return Response(content, status_code=up.status,
                                media_type=up.headers.get("content-type", "application/json"),
                                headers={"x-beluga-worker": w.url})
            return StreamingResponse(_relay(up, w, facts, route, t0, release), media_type="text/event-stream",
                                     headers={"x-beluga-worker": w.url})
        return errors.response(503 if "no healthy" in last_error else 502, f"No worker could serve the request: "
                               f"{last_error}.", "upstream_unavailable")

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


def _begin(w: Worker, facts) -> None:
    w.in_flight += 1
    w.in_flight_tokens += facts.tokens


def _end(w: Worker, facts) -> None:
    w.in_flight -= 1
    w.in_flight_tokens -= facts.tokens


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts += [p.get("text", "") for p in c if isinstance(p, dict)]
        return "\n".join(parts)
    p = body.get("prompt", "")
    return p if isinstance(p, str) else json.dumps(p)
