"""Real vLLM CPU engines on the bundled model, sharing one pool: the vertical slice.

Engine A (core 0) and engine B (core 1) are separate processes. A computes a ~2,000-token prompt and
saves its KV into the pool; B serves the same prompt from the pool.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from conftest import ServerProcess, free_port

from beluga import model
from beluga.cxlpool import pool as pool_mod
from beluga.workers.connector import connector_config
from beluga.workers.engine import EngineProcess, EngineSettings
from beluga.workers.kvformat import CPU_BLOCK_TOKENS as BLOCK
from beluga.workers.kvformat import from_model_dir

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

WORDS = ("the pool holds key value blocks that any engine computed so that another engine can reuse them "
         "instead of computing the same long prefix again while the router balances load").split()


def long_prompt(tokens: int = 2000, tag: str = "") -> str:
    body = " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(tokens - 20))
    return f"{tag}Read the notes and answer.\n{body}\nQuestion: what does the pool hold?\nAnswer:"


def complete(url: str, prompt: str | list[int], **extra) -> tuple[float, str, dict]:
    """Streamed greedy completion: (time to first token, text, usage)."""
    body = {"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0, ttft, text, usage = time.perf_counter(), None, "", {}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices"):
                ttft = ttft or time.perf_counter() - t0
                text += d["choices"][0]["text"]
            usage = d.get("usage") or usage
    return ttft, text, usage


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A pool server and two engines with the connector, started once for this module."""
    from beluga.cxlpool.settings import PoolSettings

    mdir = model.path_or_raise()
    path = f"/dev/shm/beluga-engines-{free_port()}"
    s = PoolSettings(path=[path], size=1 << 30, tcp_port=free_port(), admin_port=free_port())
    pool_mod.create(s, from_model_dir(mdir)).close()
    srv = ServerProcess(s).start()
    logs = tmp_path_factory.mktemp("engines")
    engines = []
    for name, core in (("A", "0"), ("B", "1")):
        port = free_port()
        metrics = free_port()
        es = EngineSettings(model=str(mdir), port=port, cores=core, kv_space_gb=1, max_model_len=4096,
                            log_file=str(logs / f"{name}.log"),
                            connector=connector_config(path, metrics_port=metrics, tcp_port=s.tcp_port))
        engines.append((EngineProcess(es).start(), metrics))
    try:
        for e, _ in engines:
            e.wait_ready()
        yield srv, engines[0], engines[1]
    finally:
        for e, _ in engines:
            e.stop()
        srv.stop()
        for p in (path, path + ".bell"):
            if os.path.exists(p):
                os.unlink(p)


def metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[1])
    return 0.0


def test_capital_of_france(fleet):
    _, (a, _), _ = fleet
    r = httpx.post(a.settings.url + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_engine_b_serves_what_engine_a_computed(fleet):
    srv, (a, a_metrics), (b, b_metrics) = fleet
    prompt = long_prompt(2000, "slice ")
    ttft_a, text_a, usage_a = complete(a.settings.url, prompt)
    assert usage_a["prompt_tokens"] > 1800 and usage_a["prompt_tokens_details"]["cached_tokens"] == 0
    saved = metric(a_metrics, "beluga_connector_saved_blocks")
    assert saved >= usage_a["prompt_tokens"] // BLOCK - 1

    hit_before = metric(b_metrics, "beluga_connector_hit_tokens")
    ttft_b, text_b, usage_b = complete(b.settings.url, prompt)
    cached = usage_b["prompt_tokens_details"]["cached_tokens"]
    assert metric(b_metrics, "beluga_connector_hit_tokens") - hit_before == cached
    assert text_b == text_a, "engine B's greedy output differs from engine A's"
    assert usage_a["prompt_tokens"] % BLOCK, "pick a prompt that ends in a partial block"
    assert cached == usage_a["prompt_tokens"] - 1  # all but the last token: full blocks and the partial tail
    assert metric(b_metrics, "beluga_connector_loaded_blocks") >= -(-cached // BLOCK)
    # Bytes: each block B loaded matched the checksum A committed (a mismatch would count here).
    assert metric(b_metrics, "beluga_connector_bad_blocks") == 0 and srv.stats()["integrity_failures"] == 0
    assert ttft_b <= 0.2 * ttft_a, f"TTFT from the pool {ttft_b:.2f}s vs computing {ttft_a:.2f}s"
    # A run without the pool: B computes the same tokens itself (another salt: no pool or local hit).
    _, text_plain, usage_plain = complete(b.settings.url, prompt, cache_salt="no-pool-run")
    assert usage_plain["prompt_tokens_details"]["cached_tokens"] == 0 and text_plain == text_a


def test_partial_prefix_hit_loads_only_shared_blocks(fleet):
    _, (a, _), (b, b_metrics) = fleet
    shared = long_prompt(1000, "partial ")
    complete(a.settings.url, shared + " first ending")
    before = metric(b_metrics, "beluga_connector_loaded_blocks")
    _, text_b, usage = complete(b.settings.url, shared + " a different ending entirely, longer than the first")
    loaded = metric(b_metrics, "beluga_connector_loaded_blocks") - before
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < usage["prompt_tokens"] and loaded == cached // BLOCK
    _, text_a, _ = complete(a.settings.url, shared + " a different ending entirely, longer than the first")
    assert text_a == text_b


def test_a_prompt_tail_is_reused_only_by_the_same_tokens(fleet):
    _, (a, _), (b, _) = fleet
    ids = [(i * 37) % 5000 + 100 for i in range(BLOCK * 20 + 11)]  # 20 full blocks and an 11-token tail
    other = ids[:-1] + [ids[-1] + 1]  # the same full blocks, another tail
    _, text_a, _ = complete(a.settings.url, ids)
    _, _, usage = complete(b.settings.url, other)
    assert usage["prompt_tokens_details"]["cached_tokens"] == BLOCK * 20  # the full blocks, not A's tail
    _, text_b, usage = complete(b.settings.url, ids)
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(ids) - 1 and text_b == text_a


def test_cache_salt_isolates_tenants(fleet):
    _, (a, _), (b, _) = fleet
    prompt = long_prompt(1000, "salted ")
    _, text_x, _ = complete(a.settings.url, prompt, cache_salt="tenant-x")
    _, text_y, usage_y = complete(b.settings.url, prompt, cache_salt="tenant-y")
    assert usage_y["prompt_tokens_details"]["cached_tokens"] == 0  # other tenant: no hit
    _, text_x2, usage_x = complete(b.settings.url, prompt, cache_salt="tenant-x")
    assert usage_x["prompt_tokens_details"]["cached_tokens"] > 0  # same tenant: hit
    assert text_x == text_y == text_x2


def test_corrupted_block_is_recomputed_never_served(fleet):
    """Flip bytes of a block A committed (memory corruption, a torn write): B must notice (checksum), drop it,
    recompute from there, and still answer exactly as A did."""
    import numpy as np

    from beluga.cxlpool.layout import COMMITTED, HEADER_BYTES, SLOT_HEADER
    from beluga.cxlpool.settings import PoolSettings

    srv, (a, _), (b, b_metrics) = fleet
    pool = pool_mod.attach(PoolSettings(path=srv.settings.path))
    headers = np.ndarray(pool.geo.n_slots, SLOT_HEADER, buffer=pool.mem, offset=pool.geo.hdr_off,
                         strides=(HEADER_BYTES,))
    before = set(np.nonzero(headers["state"] == COMMITTED)[0].tolist())
    prompt = long_prompt(1200, "corrupt ")
    _, text_a, _ = complete(a.settings.url, prompt)
    new = sorted(set(np.nonzero(headers["state"] == COMMITTED)[0].tolist()) - before,
                 key=lambda s: int(headers["commit_ns"][s]))
    assert len(new) >= 8
    victim = pool.geo.data_off + new[4] * pool.geo.slot_bytes  # the fifth block of the chain
    pool.mem[victim + 1000: victim + 1064] ^= 0xFF
    bad_before = metric(b_metrics, "beluga_connector_bad_blocks")
    _, text_b, _ = complete(b.settings.url, prompt)
    assert text_b == text_a
    assert metric(b_metrics, "beluga_connector_bad_blocks") > bad_before
    assert srv.stats()["integrity_failures"] >= 1  # reported, and dropped from the index
    pool.close()


def test_pool_server_down_engines_recompute(fleet):
    srv, (a, _), (b, b_metrics) = fleet
    prompt = long_prompt(600, "down ")
    _, text_a, _ = complete(a.settings.url, prompt)
    srv.kill()
    try:
        t0 = time.perf_counter()
        _, text_b, usage = complete(b.settings.url, prompt)
        assert text_b == text_a and usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert time.perf_counter() - t0 < 60
        assert metric(b_metrics, "beluga_connector_fallbacks") >= 1
    finally:
        srv.start()
