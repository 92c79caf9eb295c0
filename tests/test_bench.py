"""Small runs of the benchmark scripts, so they cannot rot. Their numbers are not asserted against
targets here (timed tests are flaky on a shared 2-core machine); BENCHMARKS.md has the real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(900)


def run(*args, timeout=600) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_pool_bench_quick_has_every_key():
    out = json.loads(run("bench/pool.py", "--json", "--quick").strip().splitlines()[-1])
    for k in ("rpc_shm_p50_us", "rpc_shm_p99_us", "rpc_tcp_p50_us", "write_GBps", "read_GBps", "memcpy_GBps",
              "lookup_1000_ms", "index_1m_lookup_us", "coh_store_clflush_write_us", "coh_ntstore_write_us",
              "coh_clflush_read_us", "coh_plain_read_us"):
        assert out[k] > 0, k
    assert out["rpc_tcp_p50_us"] > out["rpc_shm_p50_us"]


def test_kernel_bench_cpu():
    out = json.loads(run("bench/kernels.py", "--cpu", "--json"))
    assert out["cpu_gather_GBps"] > 0 and out["numpy_copy_GBps"] > 0


def test_router_bench_short():
    out = json.loads(run("bench/router.py", "--json", "--seconds", "1", "--requests", "200"))
    assert out["router_max_rps"] > 0 and out["router_p50_ms"] >= out["direct_p50_ms"] * 0.5


def test_simulator():
    out = json.loads(run("bench/simulate.py", "--json", "--sizes", "16"))
    row = out["rows"][0]
    assert row["shared_pool_least_loaded_qps"] > row["private_affinity_qps"]  # Zipf load piles onto owners


@pytest.mark.engine
def test_e2e_quick(tmp_path):
    run("bench/e2e.py", "--quick", "--out", str(tmp_path), timeout=880)
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == {"plain-rr-512", "beluga-512"}
    for passes in res["runs"].values():
        assert [p["errors"] for p in passes] == [0, 0]
    assert res["runs"]["beluga-512"][1]["cached_tokens"] > 0
    assert res["targets"]["outputs_equal_across_passes"]
    assert "| beluga 512 | 2 |" in (tmp_path / "table.md").read_text()
