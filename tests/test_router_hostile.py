"""The router against a hostile client: fuzzed and malformed bodies, oversized and trickled bodies, slow
heads, missing keys, colliding tenant salts, a failing DNS.

Everything goes over real HTTP to the router on a real uvicorn server on loopback, started the way the
CLI starts it (`limits.uvicorn_config`; for the memory and key-file tests, `python -m beluga router` in its
own process). The worker behind it is a fake upstream (a small FastAPI app that records what reaches it and
checks the worker key as vLLM's --api-key does on /v1), not a vLLM engine: these tests are about the
router's own behaviour, and they must run while engines are busy elsewhere. The same isolation with real
engines is tests/test_tenants_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from conftest import free_port
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from test_router import Served, router_for

from beluga.router import tenants
from beluga.router.app import create_app
from beluga.router.limits import uvicorn_config
from beluga.router.settings import RouterSettings

WORKER_KEY = "worker-secret"
KEYS = {"sk-a": "a", "sk-ab": "a:b"}
ADMIN = "admin-key"


def fake_upstream(seen: list) -> FastAPI:
    """Answers like a vLLM worker started with --api-key: /v1/* needs the key, /health does not."""
    app = FastAPI()

    @app.middleware("http")
    async def key(request: Request, call_next):
        if request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {WORKER_KEY}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"data": []}  # no model list: the router then forwards every model name (more fuzz gets through)

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        seen.append((dict(request.headers), await request.json()))
        return {"choices": [{"text": "ok", "index": 0}], "usage": {"prompt_tokens": 1}}

    return app


@pytest.fixture
def upstream():
    seen: list = []
    with Served(fake_upstream(seen), free_port()) as up:
        yield up, seen


@pytest.fixture
def router(upstream):
    up, seen = upstream
    with router_for([up.url], api_keys=KEYS, admin_api_keys=[ADMIN], worker_api_key=WORKER_KEY) as r:
        yield r, seen


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def is_openai_error(r: httpx.Response) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}


# -- bad input: 400 with OpenAI's error body, never 500 ----------------------------------------------------

HOSTILE = {
    "text part is a number": b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                             b'"text": 5}]}]}',
    "text part is null": b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                         b'"text": null}]}]}',
    "image part without url": b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", '
                              b'"image_url": {}}]}]}',
    "user message without content": b'{"model": "m", "messages": [{"role": "user"}]}',
    "unknown role": b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}',
    "message is a string": b'{"model": "m", "messages": ["hello"]}',
    "invalid utf-8": b'{"model": "m", "prompt": "\xff\xfe"}',
    "lone surrogate": b'{"model": "m", "prompt": "\\ud800"}',
    "deeply nested": b'{"model": "m", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "n = 100000": b'{"model": "m", "prompt": "x", "n": 100000}',
    "NaN temperature": b'{"model": "m", "prompt": "x", "temperature": NaN}',
    "Infinity in an extra field": b'{"model": "m", "prompt": "x", "extra": Infinity}',
    "1e999 in an extra field": b'{"model": "m", "prompt": "x", "extra": 1e999}',
    "5000-digit integer": b'{"model": "m", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
    "seed past int64": b'{"model": "m", "prompt": "x", "seed": 9223372036854775808}',
    "max_tokens 0": b'{"model": "m", "prompt": "x", "max_tokens": 0}',
    "max_tokens 1e30": b'{"model": "m", "prompt": "x", "max_tokens": 1000000000000000000000000000000}',
    "negative token id": b'{"model": "m", "prompt": [-1]}',
    "token id past int32": b'{"model": "m", "prompt": [4294967296]}',
    "empty token list": b'{"model": "m", "prompt": [[]]}',
    "no messages": b'{"model": "m", "messages": []}',
    "body is a list": b"[1, 2]",
    "body is null": b"null",
    "empty body": b"",
    "trailing garbage": b'{"model": "m", "prompt": "x"} x',
    "empty cache_salt": b'{"model": "m", "prompt": "x", "cache_salt": ""}',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_bad_input_is_a_400_with_an_openai_error(router, name):
    r, seen = router
    path = "/v1/chat/completions" if b'"messages"' in HOSTILE[name] else "/v1/completions"
    resp = httpx.post(r.url + path, content=HOSTILE[name], timeout=10,
                      headers={**auth("sk-a"), "content-type": "application/json"})
    assert resp.status_code == 400, resp.text[:300]
    assert is_openai_error(resp) and resp.json()["error"]["type"] == "invalid_request_error"
    assert not seen, "a bad request reached the worker"


@pytest.mark.timeout(90)
def test_fuzzer_over_the_openapi_never_gets_a_5xx(router):
    """Schemathesis draws requests for every operation of the router's /openapi.json, both fitting the
    schema and breaking it, for at most 40 s; the router must answer each below 500."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    r, _ = router
    schema = schemathesis.openapi.from_url(r.url + "/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    codes: Counter = Counter()
    failures: list[str] = []
    stop_at = time.monotonic() + 40

    @settings(max_examples=1000, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def one(case):
        if time.monotonic() > stop_at:
            return
        resp = case.call(base_url=r.url, headers=auth("sk-a"), timeout=10)
        codes[(case.path, resp.status_code)] += 1
        if resp.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {resp.status_code} {resp.text[:200]}")

    one()
    print("fuzzer answers (path, status): count", dict(codes))
    assert not failures, failures[:5]
    total = sum(codes.values())
    by_status = Counter(s for (_, s), n in codes.items() for _ in range(n))
    assert total >= 100 and by_status[200] and by_status[400], (total, by_status)


def _bodies():
    """OpenAI-shaped JSON bodies in which any value may be replaced by any JSON (a number where text goes,
    null, a list, NaN, a huge integer), with unknown keys here and there, encoded as JSON or as raw bytes.
    Schemathesis breaks one thing of a schema at a time; this breaks them deep inside messages too."""
    from hypothesis import strategies as st

    anything = st.recursive(
        st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**80, max_value=2**80) | st.floats()
        | st.text(max_size=12),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
        max_leaves=12)

    def maybe(shape):
        return st.one_of(*[shape] * 9, anything)  # mostly the right shape, sometimes anything

    kinds = st.sampled_from(["text", "image_url", "input_audio", "refusal", "video_url", ""])
    part = st.fixed_dictionaries({"type": maybe(kinds)}, optional={
        "text": maybe(st.text(max_size=20)), "image_url": maybe(st.fixed_dictionaries({"url": maybe(st.text())})),
        "input_audio": anything, "refusal": maybe(st.text())})
    roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard"])
    message = st.fixed_dictionaries({"role": maybe(roles)}, optional={
        "content": maybe(st.text(max_size=20) | st.lists(maybe(part), max_size=3)), "name": maybe(st.text()),
        "tool_calls": anything, "tool_call_id": anything})
    common = {"stream": maybe(st.booleans()), "n": maybe(st.integers()), "max_tokens": maybe(st.integers()),
              "temperature": maybe(st.floats()), "top_p": maybe(st.floats()), "seed": maybe(st.integers()),
              "stop": maybe(st.text() | st.lists(st.text(), max_size=3)), "cache_salt": maybe(st.text()),
              "logit_bias": maybe(st.dictionaries(st.text(max_size=4), st.floats(), max_size=2)),
              "stream_options": anything}
    extra = st.dictionaries(st.text(max_size=6), anything, max_size=2)  # fields the router does not know
    model = maybe(st.just("m"))
    chat = st.fixed_dictionaries({"model": model, "messages": maybe(st.lists(maybe(message), max_size=3))},
                                 optional={**common, "max_completion_tokens": maybe(st.integers()),
                                           "logprobs": anything, "top_logprobs": maybe(st.integers())})
    prompt = st.text(max_size=20) | st.lists(st.text(), max_size=3) | st.lists(st.integers(), max_size=4) \
        | st.lists(st.lists(st.integers(), max_size=3), max_size=3)
    completion = st.fixed_dictionaries({"model": model, "prompt": maybe(prompt)},
                                       optional={**common, "best_of": maybe(st.integers()), "echo": anything,
                                                 "logprobs": maybe(st.integers())})
    encoded = st.tuples(st.just("/v1/chat/completions"), chat, extra) \
        | st.tuples(st.just("/v1/completions"), completion, extra)
    raw = st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.binary(max_size=64))
    return st.one_of(encoded.map(lambda t: (t[0], json.dumps({**t[2], **t[1]}).encode())), raw)


@pytest.mark.timeout(90)
def test_fuzzed_json_bodies_never_get_a_5xx(router):
    from hypothesis import HealthCheck, Phase, given, settings

    r, _ = router
    codes: Counter = Counter()
    failures: list[str] = []
    stop_at = time.monotonic() + 40

    with httpx.Client(base_url=r.url, headers={**auth("sk-a"), "content-type": "application/json"},
                      timeout=10) as client:
        @settings(max_examples=1500, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(req=_bodies())
        def one(req):
            if time.monotonic() > stop_at:
                return
            path, body = req
            resp = client.post(path, content=body)
            codes[resp.status_code] += 1
            if resp.status_code >= 500 or resp.status_code != 200 and not is_openai_error(resp):
                failures.append(f"{path} {body[:300]!r} -> {resp.status_code} {resp.text[:200]}")

        one()
    print("fuzzed bodies, answers by status:", dict(codes))
    assert not failures, failures[:5]
    assert sum(codes.values()) >= 300 and codes[200] and codes[400], codes


# -- bodies: counted as they arrive, refused at the limit ---------------------------------------------------

def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _start_router_process(args: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "beluga", "router", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("router did not start")


@pytest.mark.timeout(180)
def test_a_1_gib_chunked_body_is_refused_without_being_buffered(upstream, tmp_path):
    """The router (its own process, default 8 MiB limit) is sent a chunked body that would be 1 GiB; it
    answers 413 once past the limit and its peak RSS (VmHWM, reset before the upload) stays under the
    baseline plus twice the limit. The test streams one reused 1 MiB chunk: it never holds 1 GiB."""
    up, seen = upstream
    limit = RouterSettings().max_body_bytes
    port = free_port()
    (tmp_path / "worker-key").write_text(WORKER_KEY + "\n")
    proc = _start_router_process(["--worker", up.url, "--worker-api-key-file", str(tmp_path / "worker-key")], port)
    try:
        for _ in range(20):  # warm up: first-request imports and buffers are part of the baseline
            warm = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": "w " * 1000})
            assert warm.status_code == 200, warm.text
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        baseline = _rss_kib(proc.pid, "VmRSS")

        chunk = os.urandom(1 << 20)
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sent, answer = 0, b""
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.setblocking(False)
        t0 = time.monotonic()
        view = memoryview(frame)
        try:
            while sent < (1 << 30) and not answer and time.monotonic() - t0 < 60:
                readable, writable, _ = select.select([s], [s], [], 1.0)
                if readable:
                    answer = s.recv(65536)
                    break
                if writable:
                    n = s.send(view[sent % len(frame):])
                    sent += n
        except (ConnectionResetError, BrokenPipeError):
            pass
        s.setblocking(True)
        s.settimeout(5)
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
        peak = _rss_kib(proc.pid, "VmHWM")
        print(f"limit {limit >> 20} MiB: sent {sent / 2**20:.1f} MiB before the router stopped reading; "
              f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB "
              f"(+{(peak - baseline) / 1024:.1f} MiB); answer {answer[:12]!r}")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert peak < baseline + 2 * limit // 1024
        assert sent < 128 << 20  # the router stopped the upload early: it did not read 1 GiB
        # A Content-Length over the limit is refused before any of the body is read.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):  # until the router closes the connection
            answer += chunk
        s.close()
        assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
        assert len(seen) == 20  # the warm-up only: nothing of either reached the worker
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


# -- slow clients -----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_trickling_connections_are_closed_within_30_s(upstream):
    """Nine connections with the default timeouts: three trickle a request head a byte every 0.5 s, three a
    body (Content-Length), one a chunked body, two send nothing. Every one must be closed within 30 s
    (head: 10 s, body: 15 s after the head), the body ones with a 408."""
    up, _ = upstream
    s = RouterSettings()
    with router_for([up.url]) as r:
        host, port = "127.0.0.1", int(r.url.rsplit(":", 1)[1])
        body_head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        chunked_head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        plans = ([("head", b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200)] * 3
                 + [("body", body_head, b'{"model": "m", "prompt": "' + b"x" * 200)] * 3
                 + [("chunked", chunked_head, b"1\r\nx\r\n" * 100)] + [("silent", b"", b"")] * 2)

        async def one(kind: str, first: bytes, trickle: bytes) -> tuple[str, float, bytes]:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(first)

            async def feed():
                for i in range(len(trickle)):
                    writer.write(trickle[i:i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.5)

            feeder = asyncio.create_task(feed())
            answer = b""
            try:
                while data := await asyncio.wait_for(reader.read(65536), 40):
                    answer += data
            except (ConnectionResetError, TimeoutError):
                pass
            took = time.monotonic() - t0
            feeder.cancel()
            writer.close()
            return kind, took, answer

        async def all_of_them():
            return await asyncio.gather(*(one(*p) for p in plans), return_exceptions=True)

        results = asyncio.run(all_of_them())
    for res in results:
        assert not isinstance(res, BaseException), res
    times = {k: max(t for kk, t, _ in results if kk == k) for k, _, _ in results}
    print("closed after (s):", {k: round(v, 1) for k, v in times.items()})
    assert all(t < 30 for _, t, _ in results), results
    assert s.head_timeout_s - 1 < times["head"] < s.head_timeout_s + 3
    assert s.body_timeout_s - 1 < times["body"] < s.body_timeout_s + 3
    assert all(a.startswith(b"HTTP/1.1 408") for k, _, a in results if k in ("body", "chunked"))


# -- keys, tenants, admin endpoints -----------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("content, line", [
    ("sk-1 tenant-1\n# a comment\n\nsk-2 tenant 2\n", 4),  # three fields
    ("sk-1\n", 1),  # one field
    ("sk-1 t1\nsk-1 t2\n", 2),  # the same key twice
])
def test_a_key_file_that_does_not_parse_stops_the_router_naming_the_line(tmp_path, content, line):
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(ValueError, match=f"line {line}"):
        create_app(RouterSettings(workers=["http://127.0.0.1:1"], api_keys_file=str(keys)))
    if line == 4:  # and the command line refuses to start, saying where (never echoing the line: a key)
        port = free_port()
        p = subprocess.run([sys.executable, "-m", "beluga", "router", "--port", str(port), "--worker",
                            "http://127.0.0.1:1", "--api-keys-file", str(keys)],
                           capture_output=True, text=True, timeout=60)
        out = " ".join((p.stdout + p.stderr).split())
        assert p.returncode != 0 and "line 4" in out and "sk-2" not in out, out


@pytest.mark.timeout(30)
def test_a_key_file_with_no_key_stops_the_router(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# nothing but comments\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        create_app(RouterSettings(workers=["http://127.0.0.1:1"], api_keys_file=str(keys)))


@pytest.mark.timeout(60)
def test_no_key_is_a_401_everywhere_but_health(router):
    r, seen = router
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/workers"), ("GET", "/metrics")]:
        for headers in ({}, auth("wrong"), {"Authorization": "Basic c2stYQ=="}, {"Authorization": "Bearer"}):
            resp = httpx.request(method, r.url + path, headers=headers, json={"model": "m", "prompt": "x"})
            assert resp.status_code == 401 and is_openai_error(resp), (path, headers, resp.text)
    assert httpx.get(r.url + "/health").status_code == 200
    # The admin key reads /workers and /metrics, and nothing of the tenants' API.
    assert httpx.get(r.url + "/workers", headers=auth(ADMIN)).status_code == 200
    assert httpx.get(r.url + "/metrics", headers=auth(ADMIN)).status_code == 200
    assert httpx.post(r.url + "/v1/completions", headers=auth(ADMIN),
                      json={"model": "m", "prompt": "x"}).status_code == 401
    assert httpx.get(r.url + "/workers", headers=auth("sk-a")).status_code == 200
    assert not seen


@pytest.mark.timeout(60)
def test_tenants_a_and_a_colon_b_reach_the_worker_with_different_salts(router):
    """Tenant "a" with salt "b", tenant "a:b" with none, and the like: each pair used to meet in one salt
    ("a:b"). The worker also gets the router's worker key, never the client's key."""
    r, seen = router
    sent = [("sk-a", "b"), ("sk-ab", None), ("sk-a", "b:c"), ("sk-ab", "c"), ("sk-a", None), ("sk-ab", "")]
    for key, salt in sent[:-1]:
        body = {"model": "m", "prompt": "x"} | ({"cache_salt": salt} if salt is not None else {})
        assert httpx.post(r.url + "/v1/completions", json=body, headers=auth(key)).status_code == 200
    salts = [b["cache_salt"] for _, b in seen]
    assert len(set(salts)) == len(salts) == 5, salts
    assert salts[0] == tenants.salt("a", "b") and salts[1] == tenants.salt("a:b", None)
    assert all(h["authorization"] == f"Bearer {WORKER_KEY}" for h, _ in seen)
    # Same tenant, same client salt: the same salt (the cache is shared within a tenant).
    httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "y", "cache_salt": "b"}, headers=auth("sk-a"))
    assert seen[-1][1]["cache_salt"] == salts[0]


@pytest.mark.timeout(60)
def test_worker_urls_only_when_asked_for(router):
    r, _ = router
    body = {"model": "m", "prompt": "x"}
    assert "x-beluga-worker" not in httpx.post(r.url + "/v1/completions", json=body, headers=auth("sk-a")).headers
    debug = httpx.post(r.url + "/v1/completions", json=body, headers={**auth("sk-a"), "x-beluga-debug": "1"})
    assert debug.headers["x-beluga-worker"].startswith("http://127.0.0.1:")


@pytest.mark.timeout(60)
def test_a_worker_refusing_the_worker_key_gets_no_request(upstream):
    """A router with the wrong worker key sees its workers refuse /v1/models: they are ejected, the client
    gets a 503 (not the worker's 401, which would blame the client's key), and no URL leaks in it."""
    up, seen = upstream
    with router_for([up.url], worker_api_key="not-the-key") as r:
        assert [w["healthy"] for w in httpx.get(r.url + "/workers").json()] == [False]
        resp = httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"})
    assert resp.status_code == 503 and is_openai_error(resp) and "127.0.0.1" not in resp.text
    assert not seen


# -- discovery --------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_failed_dns_lookup_keeps_the_last_worker_list(upstream, monkeypatch):
    """DNS discovery of a name that resolves to the fake worker, then fails (as a resolver timing out does):
    the router keeps the worker through several refreshes and goes on serving."""
    up, _ = upstream
    port = int(up.url.rsplit(":", 1)[1])
    name, dns = "workers.beluga.invalid", {"ok": True, "lookups": 0}
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host != name:
            return real(host, *args, **kwargs)
        dns["lookups"] += 1
        if not dns["ok"]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    s = RouterSettings(port=free_port(), discovery="dns", dns_name=name, dns_port=port, worker_api_key=WORKER_KEY,
                       health_interval_s=0.2)
    app = create_app(s)
    config = uvicorn_config(app, s, log_level="error")
    config.loop = "asyncio"  # uvloop resolves names itself, past the patched socket.getaddrinfo
    with Served(app, s.port, config) as r:
        assert [w["url"] for w in httpx.get(r.url + "/workers").json()] == [up.url]
        dns["ok"], before = False, dns["lookups"]
        deadline = time.monotonic() + 10
        while dns["lookups"] < before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dns["lookups"] >= before + 3, "the router stopped looking up"
        view = httpx.get(r.url + "/workers").json()
        assert [(w["url"], w["healthy"]) for w in view] == [(up.url, True)]
        assert httpx.post(r.url + "/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 200

