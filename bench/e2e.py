"""bench/e2e.py: the Beluga paper's experiment on this machine, Beluga against its peers side by side.

    python bench/e2e.py [--lengths 2000 4000] [--rows 6] [--concurrency 2] [--out DIR] [--quick]

Same synthetic LV-Eval data, two passes (populate, then warm, in a new order), closed loop, 2 vLLM CPU
workers on the bundled model behind our router, for each configuration:
  plain-rr        plain vLLM (own prefix cache only), round-robin
  plain-affinity  plain vLLM, prefix-affinity (the cache-aware baseline)
  lmcache-tcp     LMCache's multiprocess server over TCP on 127.0.0.1 (the network KV store), least-loaded
  example-disk    vLLM's example disk connector on one shared folder (the single-host floor), least-loaded
  beluga          the shared pool, least-loaded
Writes per configuration and length a loadgen output folder, `table.md` (the paper's Table 5 columns),
`results.json` (targets, output equality across passes, TTFT against context length), and plots.
`--quick` is the small version that `make test` runs so the script cannot rot.

Each length gets its own documents (another synthesis seed), so one length's run cannot warm another's.
Each worker's own KV cache (vLLM CPU's smallest, 1 GB: 23,000 tokens) holds less than its share of a
pass's working set at 4,000 tokens (18 requests: 72,000 tokens, 36,000 a worker), as on the paper's GPUs
where the documents outgrow HBM; the shared stores (Beluga's pool, LMCache's server, the shared folder)
each hold all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from beluga.cxlpool.bench import free_port
from beluga.loadgen import report, synth
from beluga.loadgen.replay import ReplaySettings
from beluga.loadgen.replay import run as replay

ROOT = Path(__file__).resolve().parent.parent
ALL = ("plain-rr", "plain-affinity", "lmcache-tcp", "example-disk", "beluga")
SUBSETS = ("hotpotwikiqa_mixup", "multifieldqa_en_mixup", "factrecall_en")
NEAR_TIE = 1e-3
STORE_GB = 6  # Beluga's pool and LMCache's memory tier: room for both lengths' working sets




def free_pair(avoid: set[int]) -> int:
    """A base port such that base and base+1 are free and not in `avoid` (the workers' ports)."""
    while True:
        base = free_port()
        if base + 1 < 65536 and not {base, base + 1} & avoid:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + 1))
                return base
            except OSError:
                continue


class Peer:
    """Whatever a configuration needs besides `beluga serve` (the LMCache server, a shared folder)."""

    def __init__(self, name: str, logs: Path):
        self.name, self.logs = name, logs
        self.proc = None
        self.folder = None

    def serve_flags(self) -> list[str]:
        if self.name == "plain-rr":
            return ["--no-pool", "--policy", "round-robin"]
        if self.name == "plain-affinity":
            return ["--no-pool", "--policy", "prefix-affinity"]
        if self.name == "beluga":
            return ["--policy", "least-loaded"]
        if self.name == "example-disk":
            self.folder = tempfile.mkdtemp(prefix="beluga-e2e-example-")
            cfg = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"shared_storage_path": self.folder}}
            return ["--policy", "least-loaded", "--kv-transfer-config", json.dumps(cfg)]
        if self.name == "lmcache-tcp":
            port, http = free_port(), free_port()
            env = dict(os.environ, LMCACHE_TRACK_USAGE="false")
            exe = str(Path(sys.executable).parent / "lmcache")
            self.proc = subprocess.Popen(
                [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--chunk-size", "128", "--l1-size-gb",
                 str(STORE_GB), "--no-l1-use-lazy", "--eviction-policy", "LRU", "--supported-transfer-mode", "auto",
                 "--http-host", "127.0.0.1", "--http-port", str(http), "--disable-observability"],
                stdout=open(self.logs / "lmcache.log", "w"), stderr=subprocess.STDOUT, env=env)
            _wait_port(http, 120, self.proc)
            cfg = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
                "lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port, "lmcache.mp.mq_timeout": 60,
                "lmcache.mp.mp_transfer_mode": "engine_driven"}}
            return ["--policy", "least-loaded", "--kv-transfer-config", json.dumps(cfg)]
        raise ValueError(f"unknown configuration {self.name}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _wait_port(port: int, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing on port {port} after {timeout}s")


class Stack:
    """`beluga serve` with a configuration's flags, on free ports."""

    def __init__(self, name: str, logs: Path, kv_space_gb: float):
        self.peer = Peer(name, logs)
        self.logs = logs / name
        self.logs.mkdir(parents=True, exist_ok=True)
        peer_flags = self.peer.serve_flags()  # first: a peer's server takes its ports before we pick ours
        self.port = free_port()
        self.pool = f"/dev/shm/beluga-e2e-{self.port}"
        cmd = [sys.executable, "-m", "beluga", "serve", "--port", str(self.port), "--worker-base-port",
               str(free_pair({self.port})), "--pool", self.pool, "--pool-size", f"{STORE_GB}G", "--log-dir",
               str(self.logs), "--kv-space-gb", str(kv_space_gb),
               "--pool-admin-port", str(free_port()), "--pool-tcp-port", str(free_port()), *peer_flags]
        self.proc = subprocess.Popen(cmd, stdout=open(self.logs / "serve.out", "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: beluga serve exited; see {self.logs}/serve.out")
            try:
                ws = httpx.get(self.url + "/workers", timeout=2).json()
                if isinstance(ws, list) and len([w for w in ws if w["healthy"]]) == 2:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{name}: not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.peer.stop()
        for p in (self.pool, self.pool + ".bell"):
            if os.path.exists(p):
                os.unlink(p)


def compare_passes(out_dir: Path) -> dict:
    """Pass 2's greedy output must equal pass 1's for the same request, unless the first differing token
    was a near-tie (top-2 logprob gap under 1e-3)."""
    import csv

    with (out_dir / "requests.csv").open() as f:
        failed = {(int(r["pass"]), r["id"]) for r in csv.DictReader(f) if r["ok"] != "True"}
    rows = [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        if (r["pass"], r["id"]) not in failed:  # failed requests are counted as errors, not compared
            by.setdefault(r["id"], {})[r["pass"]] = r
    same, near_ties, different = 0, [], []
    for rid, passes in by.items():
        if 1 not in passes or 2 not in passes:
            continue
        a, b = passes[1], passes[2]
        if a["text"] == b["text"]:
            same += 1
            continue
        ta, tb = a["top_logprobs"], b["top_logprobs"]
        k = next((i for i in range(min(len(ta), len(tb))) if max(ta[i], key=ta[i].get) != max(tb[i], key=tb[i].get)),
                 None)
        gap = None
        if k is not None:
            top = sorted(ta[k].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else None
        entry = {"id": rid, "position": k, "gap": gap}
        (near_ties if gap is not None and gap < NEAR_TIE else different).append(entry)
    return {"same": same, "near_ties": near_ties, "different": different}


def ttft_by_length(url: str, lengths: list[int]) -> list[dict]:
    """Miss (computed) against hit (the other worker, from the pool) for one fresh prompt per length."""
    import asyncio

    from beluga.loadgen.client import stream_request

    words = "cache pools let engines reuse long prefixes computed elsewhere".split()
    out = []

    async def one(c, prompt):
        r = await stream_request(c, url, "smollm2-135m-instruct", prompt, 4, "x", 1)
        return r.ttft_s, r.cached_tokens, r.worker

    async def go():
        async with httpx.AsyncClient(timeout=600) as c:
            for n in lengths:
                p = f"[len {n} {time.time()}] " + " ".join(words[i % len(words)] for i in range(n - 30))
                miss = await one(c, p)
                hit = await one(c, p)
                out.append({"tokens": n, "miss_ttft_s": miss[0], "hit_ttft_s": hit[0], "hit_cached_tokens": hit[1],
                            "miss_worker": miss[2], "hit_worker": hit[2]})

    asyncio.run(go())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=list(ALL), choices=ALL)
    ap.add_argument("--lengths", nargs="+", type=int, default=[2000, 4000])
    ap.add_argument("--rows", type=int, default=6, help="rows per subset")
    ap.add_argument("--kv-space-gb", type=int, default=1, help="each worker's own KV cache (whole GB)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"e2e-{time.strftime('%Y-%m-%d')}"))
    ap.add_argument("--quick", action="store_true", help="few short requests, plain-rr and beluga only")
    ap.add_argument("--resume", action="store_true", help="reuse configurations already measured in --out")
    a = ap.parse_args()
    if a.quick:
        a.configs = [c for c in a.configs if c in ("plain-rr", "beluga")] or ["beluga"]
        a.lengths, a.rows, a.max_tokens = [512], 1, 4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {}
    for i, n in enumerate(a.lengths):
        data[n] = out / f"data-{n}"
        synth.write(data[n], list(SUBSETS[:2] if a.quick else SUBSETS), rows=a.rows, length="16k", seed=11 + i,
                    words=int(n * 1.3))
    if "lmcache-tcp" in a.configs:
        try:
            import lmcache  # noqa: F401
        except ImportError:
            print("lmcache is not installed (make bench-deps): skipping lmcache-tcp", file=sys.stderr)
            a.configs.remove("lmcache-tcp")
    results: dict = {"configs": a.configs, "lengths": a.lengths, "machine": f"{os.cpu_count()} cores, vLLM CPU "
                     "0.32.0, SmolLM2-135M float32, 2 workers (one core each)", "date": time.strftime("%Y-%m-%d"),
                     "requests_per_pass": a.rows * (2 if a.quick else len(SUBSETS)), "kv_space_gb": a.kv_space_gb,
                     "concurrency": a.concurrency, "max_tokens": a.max_tokens,
                     "runs": {}, "outputs": {}}
    dirs = []
    for name in a.configs:
        done = [out / f"{name}-{n}" for n in a.lengths]
        by_length = out / "ttft_by_length.json"
        if a.resume and all((d / "summary.json").exists() for d in done) and (name != "beluga" or by_length.exists()):
            for n, d in zip(a.lengths, done, strict=True):
                results["runs"][f"{name}-{n}"] = json.loads((d / "summary.json").read_text())["passes"]
                results["outputs"][f"{name}-{n}"] = compare_passes(d)
            if name == "beluga":
                results["ttft_by_length"] = json.loads(by_length.read_text())
            dirs += done
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        stack = Stack(name, out / "logs", a.kv_space_gb)
        try:
            for n in a.lengths:
                d = out / f"{name}-{n}"
                s = replay(ReplaySettings(target=stack.url, data=str(data[n]), out=str(d), max_input_tokens=n,
                                          concurrency=a.concurrency, max_tokens=a.max_tokens, passes=2, logprobs=2,
                                          name=f"{name} {n}", length="16k"))
                results["runs"][f"{name}-{n}"] = s["passes"]
                results["outputs"][f"{name}-{n}"] = compare_passes(d)
                dirs.append(d)
            if name == "beluga":
                results["ttft_by_length"] = ttft_by_length(stack.url, [512, 1024, 2048, 4096] if not a.quick
                                                           else [512])
                by_length.write_text(json.dumps(results["ttft_by_length"]))
        finally:
            stack.stop()
    table = report.compare(dirs)
    (out / "table.md").write_text(table + "\n")
    results["targets"] = targets(results, a)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print(table)
    print(json.dumps(results["targets"], indent=1))
    return 0


def targets(r: dict, a) -> dict:
    runs = r["runs"]

    def get(cfg, n, p, k):
        run = runs.get(f"{cfg}-{n}")
        return run[p - 1][k] if run else None

    t = {}
    for n in a.lengths:
        b2, l2, e2 = get("beluga", n, 2, "ttft_mean_s"), get("lmcache-tcp", n, 2, "ttft_mean_s"), get(
            "example-disk", n, 2, "ttft_mean_s")
        q_b, q_1 = get("beluga", n, 2, "qps"), get("plain-rr", n, 2, "qps")
        t[n] = {
            "pass2_ttft_reduction_vs_lmcache": (1 - b2 / l2) if b2 and l2 else None,
            "pass2_ttft_vs_example_disk": (b2 / e2) if b2 and e2 else None,
            "pass2_qps_ratio_vs_plain_rr": (q_b / q_1) if q_b and q_1 else None,
            "pass1_qps_vs_plain_rr": (get("beluga", n, 1, "qps") / get("plain-rr", n, 1, "qps"))
            if get("beluga", n, 1, "qps") and get("plain-rr", n, 1, "qps") else None,
        }
    t["outputs_equal_across_passes"] = all(not o["different"] for o in r["outputs"].values())
    return t


def plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(r["runs"])
    x = np.arange(len(keys))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p, style in ((1, "#9bb7d4"), (2, "#2f5f8f")):
        for ax, metric in ((axes[0], "ttft_mean_s"), (axes[1], "qps")):
            ax.bar(x + (p - 1.5) * 0.4, [r["runs"][k][p - 1][metric] or 0 for k in keys], 0.4, color=style,
                   label=f"pass {p}")
    axes[0].set_title("mean TTFT (s)")
    axes[1].set_title("QPS")
    for ax in axes:
        ax.set_xticks(x, keys, rotation=60, ha="right", fontsize=7)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e2e.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
