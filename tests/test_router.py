"""Router behaviour that needs workers which fail on purpose.

Real vLLM engines cannot be told to answer 500 or to die mid-stream, so these tests stand small HTTP
workers in for them (real uvicorn servers speaking the same OpenAI wire format). Everything else about
the router is tested against `beluga serve` with real engines in test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import free_port
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from beluga.router import policies, tenants
from beluga.router.app import create_app
from beluga.router.limits import uvicorn_config
from beluga.router.registry import Worker
from beluga.router.settings import RouterSettings

pytestmark = pytest.mark.timeout(120)


def stub_worker(name: str, mode: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=200 if mode.get("healthy", True) else 503)

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "m"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        mode.setdefault("seen", []).append(body)
        if mode.get("fail500"):
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode.get("slow"):
            await asyncio.sleep(mode["slow"])
        if not body.get("stream"):
            return {"choices": [{"text": name}], "usage": {"prompt_tokens": 1}}

        async def gen():
            for i in range(3):
                yield f"data: {json.dumps({'choices': [{'text': f'{name}{i}'}]})}\n\n".encode()
                await asyncio.sleep(0.05)
                if mode.get("die_mid_stream") and i == 1:
                    raise RuntimeError("worker died")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


class Served:
    """An ASGI app on a real uvicorn server in a thread: a stub worker, or the router with its own
    server settings (`limits.uvicorn_config`) when given a config."""

    def __init__(self, app, port, config: uvicorn.Config | None = None):
        config = config or uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def two_stubs():
    modes = [{}, {}]
    with Served(stub_worker("a", modes[0]), free_port()) as a, Served(stub_worker("b", modes[1]), free_port()) as b:
        yield (a, modes[0]), (b, modes[1])


def router_for(urls, **kw):
    s = RouterSettings(workers=urls, port=free_port(), health_interval_s=0.2, **kw)
    app = create_app(s)
    return Served(app, s.port, uvicorn_config(app, s, log_level="error"))


def test_least_loaded_alternates_idle_workers(two_stubs):
    (a, _), (b, _) = two_stubs
    with router_for([a.url, b.url]) as r:
        got = [httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"}).json()["choices"][0]["text"]
               for _ in range(4)]
    assert sorted(got) == ["a", "a", "b", "b"]


def test_5xx_before_first_byte_is_retried_on_another_worker(two_stubs):
    (a, ma), (b, mb) = two_stubs
    ma["fail500"] = True
    with router_for([a.url, b.url], policy="round-robin") as r:
        for _ in range(3):
            resp = httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"})
            assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "b"
        assert "beluga_router_retries_total" in httpx.get(r.url + "/metrics").text


def test_dead_worker_is_ejected_and_readmitted(two_stubs):
    (a, ma), (b, _) = two_stubs
    with router_for([a.url, b.url]) as r:
        ma["healthy"] = False
        time.sleep(0.8)
        view = {w["url"]: w["healthy"] for w in httpx.get(r.url + "/workers").json()}
        assert view == {a.url: False, b.url: True}
        assert {httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"}).json()["choices"][0]["text"]
                for _ in range(3)} == {"b"}
        ma["healthy"] = True
        time.sleep(0.8)
        assert all(w["healthy"] for w in httpx.get(r.url + "/workers").json())


def test_worker_dying_mid_stream_ends_the_stream_with_an_error_event(two_stubs):
    (a, ma), _ = two_stubs
    ma["die_mid_stream"] = True
    with router_for([a.url]) as r:
        with httpx.stream("POST", r.url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": True},
                          timeout=10) as resp:
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"


def test_admission_limit_answers_429(two_stubs):
    (a, ma), _ = two_stubs
    ma["slow"] = 1.0
    with router_for([a.url], max_in_flight=1, max_queue=0) as r:
        async def burst():
            async with httpx.AsyncClient(timeout=10) as c:
                return await asyncio.gather(*(c.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"})
                                              for _ in range(3)))
        codes = sorted(x.status_code for x in asyncio.run(burst()))
    assert codes[0] == 200 and 429 in codes


def test_api_keys_map_to_tenant_cache_salt(two_stubs):
    (a, ma), _ = two_stubs
    with router_for([a.url], api_keys={"sk-1": "acme"}) as r:
        denied = httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"},
                        headers={"Authorization": "Bearer sk-1"})
        assert ok.status_code == 200 and ma["seen"][-1]["cache_salt"] == tenants.salt("acme", None)
        assert "x-beluga-worker" not in ok.headers  # internal URLs only when asked for


def test_bad_requests_get_openai_errors(two_stubs):
    (a, _), _ = two_stubs
    with router_for([a.url], max_body_bytes=1000) as r:
        bad_json = httpx.post(r.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
        missing = httpx.post(r.url + "/v1/chat/completions", json={"model": "m"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
        unknown = httpx.post(r.url + "/v1/completions", json={"model": "other", "prompt": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        big = httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x" * 2000})
        assert big.status_code == 413
        # and it keeps working
        assert httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200


def test_prefix_affinity_is_sticky_and_power_of_two_prefers_idle():
    ws = [Worker(f"http://w{i}", healthy=True) for i in range(4)]
    aff = policies.make("prefix-affinity")
    facts = policies.RequestFacts("the same long document", 100)
    assert len({aff.choose(ws, facts).url for _ in range(10)}) == 1
    spread = {aff.choose(ws, policies.RequestFacts(f"doc {i}", 1)).url for i in range(64)}
    assert len(spread) >= 3
    p2 = policies.make("power-of-two")
    ws[0].in_flight = ws[1].in_flight = ws[2].in_flight = 5
    picks = [p2.choose(ws, facts).url for _ in range(200)]
    assert picks.count("http://w3") > 80  # the idle one wins whenever it is drawn
    with pytest.raises(ValueError, match="unknown policy"):
        policies.make("nope")
