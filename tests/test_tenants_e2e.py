"""Tenant isolation end to end, with real vLLM CPU engines sharing one pool behind the router.

The stack (started once for the module, like test_engines.py's): a pool file under /dev/shm and its
metadata server (`conftest.ServerProcess`), two vLLM engines (`EngineProcess`, cores 0 and 1) with the
Beluga connector, each started with vLLM's own API key (`VLLM_API_KEY` in the engine's environment, which
vLLM reads as `--api-key`), and `python -m beluga router` in front of them with two tenants' keys
("a" and "a:b") and the workers' key (`--worker-api-key-file`).

What it shows: a prompt computed for one tenant is never a cache hit for the other, even when the client
salts collide under the old `tenant:salt` join ("a" + salt "b" against tenant "a:b"), through the engine's
own prefix cache or the shared pool; the same tenant does hit (> 0 cached tokens); and a client that
reaches a worker directly cannot use it without the workers' key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ServerProcess, free_port
from test_engines import long_prompt

from beluga import model
from beluga.cxlpool import pool as pool_mod
from beluga.workers.connector import connector_config
from beluga.workers.engine import EngineProcess, EngineSettings
from beluga.workers.kvformat import from_model_dir

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]
MODEL = "smollm2-135m-instruct"
WORKER_KEY = "e2e-worker-key-0123456789abcdef"
KEYS = {"sk-tenant-a": "a", "sk-tenant-ab": "a:b"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from beluga.cxlpool.settings import PoolSettings

    tmp = tmp_path_factory.mktemp("tenants")
    mdir = model.path_or_raise()
    path = f"/dev/shm/beluga-tenants-{free_port()}"
    s = PoolSettings(path=[path], size=1 << 30, tcp_port=free_port(), admin_port=free_port())
    pool_mod.create(s, from_model_dir(mdir)).close()
    srv = ServerProcess(s).start()
    engines = [EngineProcess(EngineSettings(
        model=str(mdir), port=free_port(), cores=core, kv_space_gb=1, max_model_len=4096,
        log_file=str(tmp / f"engine-{core}.log"), env={"VLLM_API_KEY": WORKER_KEY},
        connector=connector_config(path, tcp_port=s.tcp_port))).start() for core in ("0", "1")]
    (tmp / "keys").write_text("".join(f"{k} {t}\n" for k, t in KEYS.items()))
    (tmp / "worker-key").write_text(WORKER_KEY + "\n")
    port = free_port()
    router = None
    try:
        for e in engines:
            e.wait_ready()
        cmd = [sys.executable, "-m", "beluga", "router", "--port", str(port), "--policy", "round-robin",
               "--api-keys-file", str(tmp / "keys"), "--worker-api-key-file", str(tmp / "worker-key")]
        for e in engines:
            cmd += ["--worker", e.settings.url]
        router = subprocess.Popen(cmd, stdout=open(tmp / "router.log", "w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert router.poll() is None, (tmp / "router.log").read_text()[-2000:]
            try:
                view = httpx.get(url + "/workers", headers={"Authorization": "Bearer sk-tenant-a"}, timeout=2).json()
                if len([w for w in view if w["healthy"]]) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the router did not see both workers healthy (does each accept the worker key?)")
        yield url, engines
    finally:
        if router is not None:
            router.terminate()
            router.wait(20)
        for e in engines:
            e.stop()
        srv.stop()
        for p in (path, path + ".bell", path + ".token"):
            if os.path.exists(p):
                os.unlink(p)


def cached(url: str, key: str, prompt: str, salt: str | None = None) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tenants_a_and_a_colon_b_share_no_cache_and_each_reuses_its_own(stack):
    url, _ = stack
    prompt = long_prompt(1500, "tenants ")
    # Round-robin over two workers: each tenant's second request lands on the other worker, so a hit
    # there comes through the shared pool, and a miss is a miss in both the pool and the engine's cache.
    assert cached(url, "sk-tenant-a", prompt, salt="b") == 0
    assert cached(url, "sk-tenant-ab", prompt) == 0  # "a" + "b" and "a:b" were one salt under tenant:salt
    assert cached(url, "sk-tenant-a", prompt, salt="b") > 0
    assert cached(url, "sk-tenant-ab", prompt) > 0
    # Another client salt inside tenant "a" is its own cache too, and so is no salt at all.
    assert cached(url, "sk-tenant-a", prompt, salt="c") == 0
    assert cached(url, "sk-tenant-a", prompt) == 0


def test_a_worker_answers_only_the_holder_of_the_worker_key(stack):
    _, engines = stack
    w = engines[0].settings.url
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "cache_salt": "a:b"}
    for headers in ({}, {"Authorization": "Bearer sk-tenant-a"}, {"Authorization": "Bearer wrong"}):
        assert httpx.post(w + "/v1/completions", json=body, headers=headers, timeout=60).status_code == 401
        assert httpx.post(w + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 401
        assert httpx.get(w + "/v1/models", headers=headers, timeout=60).status_code == 401
    ok = httpx.post(w + "/v1/completions", json=body, headers={"Authorization": f"Bearer {WORKER_KEY}"}, timeout=120)
    assert ok.status_code == 200
    assert httpx.get(w + "/health", timeout=10).status_code == 200  # probes need no key


@pytest.mark.xfail(reason="vLLM's --api-key guards only /v1, /v2, /inference and /cohere: its SageMaker route "
                          "/invocations serves completions without a key. Passes once the engine launcher adds "
                          "a middleware that needs the key on every path but /health (see the router "
                          "hardening notes); until then, binding and NetworkPolicy are the boundary.",
                   strict=False)
def test_no_route_of_a_worker_generates_without_the_key(stack):
    _, engines = stack
    w = engines[0].settings.url
    r = httpx.post(w + "/invocations", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2,
                                             "cache_salt": "a:b"}, timeout=120)
    assert r.status_code in (401, 403, 404), r.status_code
