"""bench/connector.py: engine B's time to first token for a prompt engine A computed, through the pool,
beside recomputing it and beside vLLM's example disk connector, in one run (CPU, bundled model).

    python bench/connector.py [--tokens 2000] [--repeats 3] [--json]

Engines A and B are separate vLLM CPU processes, one core each. For each path, A computes a fresh prompt,
then B serves it; "recompute" is B computing a fresh prompt of the same length itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from beluga import model
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.bench import free_port
from beluga.cxlpool.settings import PoolSettings
from beluga.loadgen.client import stream_request
from beluga.workers.connector import connector_config
from beluga.workers.engine import EngineProcess, EngineSettings
from beluga.workers.kvformat import from_model_dir

WORDS = ("shared memory pools let every engine reuse the key value cache that another engine computed for "
         "the same long document while the router only balances load").split()


def prompt(tokens: int, tag: str) -> str:
    body = " ".join(WORDS[(i * 5 + len(tag)) % len(WORDS)] for i in range(tokens - 20))
    return f"[{tag}] Read the notes.\n{body}\nQuestion: what do the pools let engines do?\nAnswer:"




def ttft(url: str, text: str) -> tuple[float, str, int]:
    async def go():
        async with httpx.AsyncClient(timeout=600) as c:
            return await stream_request(c, url, "smollm2-135m-instruct", text, 8, "x", 1)

    r = asyncio.run(go())
    if not r.ok:
        raise RuntimeError(r.error)
    return r.ttft_s, r.text, r.cached_tokens


def pair(mdir: str, connector: dict, logs: str, name: str) -> list[EngineProcess]:
    engines = []
    for who, core in (("A", "0"), ("B", "1")):
        es = EngineSettings(model=mdir, port=free_port(), cores=core, kv_space_gb=1, max_model_len=8192,
                            log_file=f"{logs}/{name}-{who}.log", connector=connector)
        engines.append(EngineProcess(es).start())
    for e in engines:
        e.wait_ready()
    return engines


def measure(a: EngineProcess, b: EngineProcess, tokens: int, repeats: int, tag: str) -> dict:
    hit, recompute, compute_a, same = [], [], [], True
    for i in range(repeats):
        p = prompt(tokens, f"{tag}-{i}")
        ta, out_a, _ = ttft(a.settings.url, p)
        tb, out_b, cached = ttft(b.settings.url, p)
        tr, _, _ = ttft(b.settings.url, prompt(tokens, f"{tag}-fresh-{i}"))
        compute_a.append(ta)
        hit.append(tb)
        recompute.append(tr)
        same &= out_a == out_b
    local, _, _ = ttft(b.settings.url, p)  # B again: vLLM's own in-process prefix cache
    return {"b_hit_ttft_s": statistics.median(hit), "b_recompute_ttft_s": statistics.median(recompute),
            "a_compute_ttft_s": statistics.median(compute_a), "b_local_prefix_cache_ttft_s": local,
            "same_output": same, "cached_tokens": cached, "runs": repeats}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    mdir = str(model.path_or_raise())
    logs = tempfile.mkdtemp(prefix="beluga-bench-")
    out = {"machine": f"{os.cpu_count()} cores, vLLM CPU 0.32.0, float32", "prompt_tokens": a.tokens}

    path = f"/dev/shm/beluga-bench-conn-{free_port()}"
    s = PoolSettings(path=[path], size=2 << 30, tcp_port=free_port(), admin_port=free_port())
    pool_mod.create(s, from_model_dir(mdir)).close()
    srv = subprocess.Popen([sys.executable, "-m", "beluga", "pool", "serve", "--no-create", "--path", path,
                            "--tcp-port", str(s.tcp_port), "--admin-port", str(s.admin_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        engines = pair(mdir, connector_config(path, tcp_port=s.tcp_port), logs, "beluga")
        try:
            out["beluga"] = measure(*engines, a.tokens, a.repeats, "beluga")
        finally:
            for e in engines:
                e.stop()
    finally:
        srv.terminate()
        srv.wait(10)
        for p in (path, path + ".bell"):
            if os.path.exists(p):
                os.unlink(p)

    folder = tempfile.mkdtemp(prefix="beluga-example-connector-")
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": folder}}
    engines = pair(mdir, example, logs, "example")
    try:
        out["example_disk_connector"] = measure(*engines, a.tokens, a.repeats, "example")
    finally:
        for e in engines:
            e.stop()
        shutil.rmtree(folder, ignore_errors=True)

    b, ex = out["beluga"], out["example_disk_connector"]
    out["hit_vs_recompute_reduction"] = 1 - b["b_hit_ttft_s"] / b["b_recompute_ttft_s"]
    out["beluga_vs_example_ttft_ratio"] = b["b_hit_ttft_s"] / ex["b_hit_ttft_s"]
    out["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
