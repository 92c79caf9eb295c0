"""bench/kernels.py: block gather/scatter between a paged KV cache and pool slots, beside references.

    python bench/kernels.py --cpu --json   CPU kernels vs numpy copying the same bytes (any machine)
    python bench/kernels.py --json         GPU (run through the device tool): per geometry and block count,
                                           our kernels vs a contiguous pinned cudaMemcpy (the ceiling),
                                           one cudaMemcpyAsync per block and layer, and torch index_select
                                           plus one copy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

GEOMETRIES = {  # layers, kv heads, head dim, bytes per element
    "smollm2-135m": (30, 3, 64, 4),
    "llama-3.1-8b": (32, 8, 128, 2),
    "qwen-32b": (64, 8, 128, 2),
}
TOKENS = 16


def cpu_bench(repeat: int = 5) -> dict:
    import torch

    from beluga.kernels import cpu, layout

    layers, heads, dim = 30, 3, 64  # the bundled model on vLLM's CPU backend, 128-token blocks
    nb, n = 96, 32
    caches = [torch.randn(nb, heads, 128, 2 * dim) for _ in range(layers)]
    lay = layout.from_tensors(caches, nb)
    ids = np.random.default_rng(0).permutation(nb)[:n].astype(np.int64)
    pool = np.zeros((n, lay.block_bytes), np.uint8)
    addrs = np.array([pool[i].ctypes.data for i in range(n)], np.int64)
    sums = np.zeros(n, np.uint64)
    total = pool.nbytes

    def best(fn):
        fn()
        return min(_timed(fn) for _ in range(repeat))

    g = best(lambda: cpu.gather(lay.bases, lay.block_stride, lay.runs, lay.run_bytes, ids, addrs, sums))
    s = best(lambda: cpu.scatter(lay.bases, lay.block_stride, lay.runs, lay.run_bytes, ids, addrs, sums))
    src = np.stack([caches[0][0].numpy().view(np.uint8).ravel()] * 1)  # warm numpy
    dst = np.empty_like(pool)
    src = np.random.default_rng(1).integers(0, 255, pool.shape, dtype=np.uint8)
    c = best(lambda: np.copyto(dst, src))
    out = {"cpu_gather_GBps": total / g / 1e9, "cpu_scatter_GBps": total / s / 1e9, "numpy_copy_GBps": total / c / 1e9,
           "bytes": total, "blocks": n, "block_bytes": lay.block_bytes}
    out["gather_vs_numpy"] = out["cpu_gather_GBps"] / out["numpy_copy_GBps"]
    out["scatter_vs_numpy"] = out["cpu_scatter_GBps"] / out["numpy_copy_GBps"]
    out["targets_met"] = out["gather_vs_numpy"] >= 0.7 and out["scatter_vs_numpy"] >= 0.7
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gpu_bench(counts=(1, 16, 256), repeat: int = 10) -> dict:
    import torch

    from beluga.cxlpool.region import Region
    from beluga.kernels import cuda as ck
    from beluga.kernels import layout

    dev = torch.device("cuda")
    rows = []
    big = max(counts)
    for name, (layers, heads, dim, es) in GEOMETRIES.items():
        dtype = torch.float32 if es == 4 else torch.bfloat16
        nb = big + 8
        caches = [torch.randn(2, nb, TOKENS, heads, dim, device=dev).to(dtype) for _ in range(layers)]  # flash
        lay = layout.from_tensors(caches, nb)
        bb = lay.block_bytes
        path = f"/dev/shm/beluga-kbench-{uuid.uuid4().hex[:6]}"
        region = Region.create(path, big * bb + (2 << 20))
        reg = ck.Registration(region.base, region.size)
        try:
            for n in counts:
                ids = torch.randperm(nb)[:n].numpy().astype(np.int64)
                addrs = np.array([reg.device_addr(region.base + i * bb) for i in range(n)], np.int64)
                nbytes = n * bb
                row = {"geometry": name, "blocks": n, "bytes": nbytes}

                def cuda_time(fn):
                    fn()
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(repeat):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        fn()
                        b.record()
                        torch.cuda.synchronize()
                        ts.append(a.elapsed_time(b) * 1e-3)
                    return float(np.median(ts))

                def wall_time(fn, repeat=repeat, done=torch.cuda.synchronize):
                    """Median wall time of fn then `done`; pass done=None for a call that returns only once
                    its work is complete (ours), which a second synchronize would only slow down."""
                    fn()
                    ts = []
                    for _ in range(repeat):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        fn()
                        if done is not None:
                            done()
                        ts.append(time.perf_counter() - t)
                    return float(np.median(ts))

                def ceiling(fn):
                    """The reference copy, completed by a device or a stream synchronize, whichever is faster."""
                    return min(wall_time(fn, reps), wall_time(fn, reps, torch.cuda.current_stream().synchronize))

                dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
                host = torch.frombuffer(region.mem[:nbytes], dtype=torch.uint8)  # registered: pinned
                reps = repeat if n > 16 else 20 * repeat
                # Time to completion on both sides: our calls return once the bytes are in place (they hand
                # back checksums), so the reference is timed the same way, copy plus synchronize. CUDA events
                # would time the reference's GPU work alone but ours with the host round trip in it.
                t_ceil_d2h = ceiling(lambda: host.copy_(dev_buf, non_blocking=True))
                t_ceil_h2d = ceiling(lambda: dev_buf.copy_(host, non_blocking=True))
                t_ceil_events = cuda_time(lambda: host.copy_(dev_buf, non_blocking=True))
                t_gather = wall_time(lambda: ck.gather(lay, ids, addrs), reps, None)
                t_scatter = wall_time(lambda: ck.scatter(lay, ids, addrs), reps, None)
                for p in ("direct", "staged"):  # both of the kernels' paths, beside what "auto" picks
                    row[f"gather_{p}_us"] = wall_time(lambda p=p: ck.gather(lay, ids, addrs, path=p), reps, None) * 1e6
                    row[f"scatter_{p}_us"] = wall_time(lambda p=p: ck.scatter(lay, ids, addrs, path=p), reps,
                                                       None) * 1e6
                flat = host.view(n, layers, 2, -1)

                def per_block():
                    for i, b in enumerate(ids.tolist()):
                        for li, t in enumerate(caches):
                            flat[i, li, 0].copy_(t[0, b].reshape(-1).view(torch.uint8), non_blocking=True)
                            flat[i, li, 1].copy_(t[1, b].reshape(-1).view(torch.uint8), non_blocking=True)

                t_per = wall_time(per_block, repeat=2)
                idx = torch.as_tensor(ids, device=dev)
                staging = torch.empty((n, layers, 2, bb // layers // 2), dtype=torch.uint8, device=dev)

                def index_select():
                    for li, t in enumerate(caches):
                        staging[:, li] = torch.index_select(t, 1, idx).transpose(0, 1).reshape(n, 2, -1).view(
                            torch.uint8)
                    host.copy_(staging.view(-1), non_blocking=True)

                t_isel = wall_time(index_select)
                row.update({
                    "ceiling_GBps": nbytes / t_ceil_d2h / 1e9, "ceiling_h2d_GBps": nbytes / t_ceil_h2d / 1e9,
                    "gather_GBps": nbytes / t_gather / 1e9, "scatter_GBps": nbytes / t_scatter / 1e9,
                    "per_block_GBps": nbytes / t_per / 1e9, "index_select_GBps": nbytes / t_isel / 1e9,
                    "ceiling_us": t_ceil_d2h * 1e6, "ceiling_h2d_us": t_ceil_h2d * 1e6,
                    "ceiling_events_us": t_ceil_events * 1e6, "gather_us": t_gather * 1e6,
                    "scatter_us": t_scatter * 1e6,
                    "per_block_us": t_per * 1e6, "index_select_us": t_isel * 1e6})
                row["gather_vs_ceiling"] = row["gather_GBps"] / row["ceiling_GBps"]
                row["scatter_vs_ceiling"] = row["scatter_GBps"] / row["ceiling_h2d_GBps"]
                row["gather_vs_per_block"] = row["gather_GBps"] / row["per_block_GBps"]
                row["gather_time_vs_ceiling"] = t_gather / t_ceil_d2h
                row["scatter_time_vs_ceiling"] = t_scatter / t_ceil_h2d
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            reg.close()
            region.close()
            os.unlink(path)
        caches = None
        torch.cuda.empty_cache()
    return {"card": torch.cuda.get_device_name(), "rows": rows}


def multi_gpu_bench(n_blocks: int = 256) -> dict | None:
    """Several GPUs gathering into one shared pool at once (one process per GPU), against one GPU."""
    import torch

    if torch.cuda.device_count() < 2:
        return None
    import subprocess

    res = {}
    for k in (1, torch.cuda.device_count()):
        procs = [subprocess.Popen([sys.executable, __file__, "--one-gpu", str(g), "--blocks", str(n_blocks)],
                                  stdout=subprocess.PIPE, text=True) for g in range(k)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        res[f"{k}_gpus_aggregate_GBps"] = sum(o["GBps"] for o in outs)
    return res


def one_gpu(gpu: int, n: int) -> None:
    import torch

    from beluga.cxlpool.region import Region
    from beluga.kernels import cuda as ck
    from beluga.kernels import layout

    torch.cuda.set_device(gpu)
    from numba import cuda

    cuda.select_device(gpu)
    layers, heads, dim, _ = GEOMETRIES["llama-3.1-8b"]
    caches = [torch.randn(2, n + 8, TOKENS, heads, dim, device="cuda").to(torch.bfloat16) for _ in range(layers)]
    lay = layout.from_tensors(caches, n + 8)
    path = f"/dev/shm/beluga-mgpu-{gpu}-{uuid.uuid4().hex[:4]}"
    region = Region.create(path, n * lay.block_bytes + (2 << 20))
    reg = ck.Registration(region.base, region.size)
    ids = np.arange(n, dtype=np.int64)
    addrs = np.array([reg.device_addr(region.base + i * lay.block_bytes) for i in range(n)], np.int64)
    ck.gather(lay, ids, addrs)
    t = time.perf_counter()
    for _ in range(10):
        ck.gather(lay, ids, addrs)
    dt = (time.perf_counter() - t) / 10
    print(json.dumps({"gpu": gpu, "GBps": n * lay.block_bytes / dt / 1e9}))
    reg.close()
    region.close()
    os.unlink(path)


def table(res: dict) -> str:
    lines = [f"card: {res['card']}", "", "| geometry | blocks | MB | ceiling GB/s (D2H / H2D) | gather GB/s | "
             "scatter GB/s | per-block GB/s | index_select GB/s | ceiling us | gather us | scatter us | "
             "gather / ceiling GB/s | scatter / ceiling GB/s | gather / per-block |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['geometry']} | {r['blocks']} | {r['bytes'] / 1e6:.1f} | {r['ceiling_GBps']:.1f} / "
                     f"{r['ceiling_h2d_GBps']:.1f} | {r['gather_GBps']:.1f} | {r['scatter_GBps']:.1f} | "
                     f"{r['per_block_GBps']:.2f} | {r['index_select_GBps']:.1f} | {r['ceiling_us']:.0f} | "
                     f"{r['gather_us']:.0f} | {r['scatter_us']:.0f} | {r['gather_vs_ceiling']:.2f} | "
                     f"{r['scatter_vs_ceiling']:.2f} | {r['gather_vs_per_block']:.0f}x |")
    lines += ["", "| geometry | blocks | ceiling us (D2H / H2D) | gather us (direct / staged) | "
              "scatter us (direct / staged) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['geometry']} | {r['blocks']} | {r['ceiling_us']:.0f} / {r['ceiling_h2d_us']:.0f} | "
                     f"{r['gather_direct_us']:.0f} / {r['gather_staged_us']:.0f} | "
                     f"{r['scatter_direct_us']:.0f} / {r['scatter_staged_us']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="CPU kernels (no GPU needed)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one-gpu", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, default=256, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one_gpu is not None:
        one_gpu(a.one_gpu, a.blocks)
        return 0
    if a.cpu:
        res = cpu_bench()
        print(json.dumps(res) if a.json else "\n".join(f"{k:20s} {v}" for k, v in res.items()))
        return 0
    res = gpu_bench()
    multi = multi_gpu_bench()
    if multi:
        res["multi_gpu"] = multi
    print(json.dumps(res) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
