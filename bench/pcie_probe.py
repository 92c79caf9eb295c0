"""bench/pcie_probe.py: how fast can an SM reach host memory, against the copy engine? (run through the device
tool: `python3 bench/pcie_probe.py [out.json]`)

Contiguous copies of 512 MB between device memory and pinned, mapped host memory, each way: the copy engine
(`cudaMemcpyAsync`), a kernel with 16-byte loads and stores (one CUDA block per 16-64 KB chunk, 128 or 256
threads, 8 loads in flight), the same with a 256-byte L2 prefetch hint on the loads, and TMA bulk copies
through shared memory (`cp.async.bulk`, whole or one side). Why `kernels.staging` exists: on an H200 none
of the SM paths passed 95 % of the copy engine device-to-host or 93 % host-to-device.

A measurement tool written in CUDA C (through CuPy, on the GPU image): the product's kernels are numba's.
"""
import json
import os
import sys

import cupy as cp
import numpy as np

SRC = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pcie_probe.cu")).read()


def main():
    nbytes = 512 << 20
    mod = cp.RawModule(code=SRC, options=("--gpu-architecture=sm_90", "-std=c++17"))
    host_ptr = cp.cuda.runtime.hostAlloc(nbytes, 1 | 2)  # portable | mapped
    host = cp.cuda.UnownedMemory(host_ptr, nbytes, None)
    hptr = host_ptr  # UVA: the device address of cudaHostAlloc memory is the host address
    dev = cp.cuda.alloc(nbytes)
    dptr = dev.ptr
    cp.cuda.runtime.memset(dptr, 1, nbytes)
    out = {"card": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "bytes": nbytes, "rows": []}

    def timed(fn, reps=7):
        fn()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(reps):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
        return float(np.median(ts))

    def row(name, direction, fn):
        t = timed(fn)
        r = {"name": name, "dir": direction, "GBps": nbytes / t / 1e9}
        out["rows"].append(r)
        print(json.dumps(r), flush=True)

    row("ce", "d2h", lambda: cp.cuda.runtime.memcpyAsync(hptr, dptr, nbytes, 2, 0))
    row("ce", "h2d", lambda: cp.cuda.runtime.memcpyAsync(dptr, hptr, nbytes, 1, 0))
    for ch in (16 << 10, 32 << 10, 64 << 10):
        grid = nbytes // ch
        for name in ("blk16", "blk16_l2"):
            k = mod.get_function(name)
            for thr in (128, 256):
                args = lambda s, d: k((grid,), (thr,), (s, d, np.int64(ch)))  # noqa: E731
                if name == "blk16":
                    row(f"{name} ch={ch >> 10}K t={thr}", "d2h", lambda: args(cp.uint64(dptr), cp.uint64(hptr)))
                row(f"{name} ch={ch >> 10}K t={thr}", "h2d", lambda: args(cp.uint64(hptr), cp.uint64(dptr)))
        for name in ("tma", "tma_ld_sm_st", "sm_ld_tma_st"):
            k = mod.get_function(name)
            k.max_dynamic_shared_size_bytes = ch
            for piece in (4 << 10, 16 << 10, ch):
                if piece > ch:
                    continue

                def go(s, d, k=k, piece=piece, grid=grid):
                    k((grid,), (128,), (s, d, np.int64(ch), np.int32(piece)), shared_mem=ch)

                dirs = {"tma": ("d2h", "h2d"), "tma_ld_sm_st": ("h2d",), "sm_ld_tma_st": ("d2h",)}[name]
                for dr in dirs:
                    s, d = (dptr, hptr) if dr == "d2h" else (hptr, dptr)
                    try:
                        row(f"{name} ch={ch >> 10}K piece={piece >> 10}K", dr, lambda: go(cp.uint64(s), cp.uint64(d)))
                    except Exception as e:  # noqa: BLE001
                        print(name, ch, piece, dr, "failed", e, flush=True)
    # correctness of the TMA path once
    cp.cuda.runtime.memset(dptr, 7, nbytes)
    k = mod.get_function("tma")
    k.max_dynamic_shared_size_bytes = 32 << 10
    k((nbytes // (32 << 10),), (128,), (cp.uint64(dptr), cp.uint64(hptr), np.int64(32 << 10), np.int32(16 << 10)),
      shared_mem=32 << 10)
    cp.cuda.Device().synchronize()
    h = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(hptr))
    out["tma_correct"] = bool((h == 7).all())
    print("tma correct", out["tma_correct"])
    for base in ("ce",):
        ce = {r["dir"]: r["GBps"] for r in out["rows"] if r["name"] == base}
    for r in out["rows"]:
        r["vs_ce"] = r["GBps"] / ce[r["dir"]]
    best = sorted(out["rows"], key=lambda r: -r["vs_ce"])
    for r in best:
        print(f"{r['dir']} {r['name']:40s} {r['GBps']:6.1f} {r['vs_ce']:.3f}")
    del host
    return out


if __name__ == "__main__":
    res = main()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
