"""GPU kernel checks, run two ways:

- in CI (no GPU): `NUMBA_ENABLE_CUDASIM=1 python tests/gpu_checks.py` -- numba's CUDA simulator runs the
  kernels on the CPU with host memory standing in for the GPU (a mock of the device, said here). The
  simulator runs every CUDA thread in Python, so geometries keep their block shape but only 2 layers.
- on a GPU (through the device tool): `python tests/gpu_checks.py` -- real kernels, torch CUDA caches,
  the pool registered with CUDA and written over PCIe.

Every check is byte-exact against a reference built with plain indexing.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import numpy as np
import torch

from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.layout import KVFormat
from beluga.cxlpool.region import Region
from beluga.cxlpool.server.service import MetadataService
from beluga.cxlpool.settings import PoolSettings
from beluga.kernels import cpu as cpu_kernels
from beluga.kernels import cuda as cuda_kernels
from beluga.kernels import layout as cache_layout
from beluga.kernels import staging

if cuda_kernels.SIMULATED:
    staging.HALF = 1  # one block a half: every staged copy of several blocks cycles through both halves

SIM = cuda_kernels.SIMULATED
DEVICE = "cpu" if SIM else "cuda"
# name: (layers, kv_heads, head_dim, dtype, block_tokens)
GEOMETRIES = {
    "smollm2-135m": (30, 3, 64, torch.float32, 16),
    "llama-3.1-8b": (32, 8, 128, torch.bfloat16, 16),
    "qwen-32b": (64, 8, 128, torch.bfloat16, 16),
}
LAYOUTS = ("flash", "flashinfer", "cpu")


def make_caches(layers, heads, dim, dtype, tokens, num_blocks, layout, fill=True):
    """Per-layer cache tensors in the shapes vLLM's backends use."""
    shape = {"flash": (2, num_blocks, tokens, heads, dim), "flashinfer": (num_blocks, 2, tokens, heads, dim),
             "cpu": (num_blocks, heads, tokens, 2 * dim)}[layout]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    out = []
    for _ in range(layers):
        t = torch.empty(shape, dtype=dtype, device=DEVICE)
        if fill:
            t.copy_(torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype))
        else:
            t.zero_()
        out.append(t)
    return out


def block_bytes_ref(caches, layout, b) -> np.ndarray:
    """A pool block built by plain indexing: for each layer, the block's runs in address order."""
    parts = []
    for t in caches:
        blk = t[:, b] if layout == "flash" else t[b]
        parts.append(blk.contiguous().view(torch.uint8).flatten().cpu().numpy())
    return np.concatenate(parts)


def check_kernels(name, geo, layout, n_blocks, pool_mem, pool_dev_base, path):
    layers, heads, dim, dtype, tokens = geo
    caches = make_caches(layers, heads, dim, dtype, tokens, n_blocks + 3, layout)
    lay = cache_layout.from_tensors(caches, n_blocks + 3)
    ids = np.array([(i * 5 + 2) % (n_blocks + 3) for i in range(n_blocks)], np.int64)
    bb = lay.block_bytes
    slots = np.arange(n_blocks)
    slots[n_blocks // 2:] = slots[n_blocks // 2:][::-1]  # a run of adjacent slots, then slots out of order
    slot_host = [pool_mem[s * bb:(s + 1) * bb] for s in slots]
    addrs = np.array([pool_dev_base + s * bb for s in slots], np.int64)
    pool_mem[:n_blocks * bb] = 0
    sums = cuda_kernels.gather(lay, ids, addrs, path=path)
    for i, b in enumerate(ids):
        ref = block_bytes_ref(caches, layout, int(b))
        assert (slot_host[i] == ref).all(), f"{name}/{layout}/{path}: gathered block {i} differs"
        assert int(sums[i]) == int(cpu_kernels.checksum(slot_host[i].ctypes.data, bb)), "checksum differs"
    # Per-layer variant: the partial sums of two layer ranges add up to the whole block's.
    half = layers // 2
    parts = sum(cuda_kernels.gather(lay, ids[:2], addrs[:2], r, path=path) for r in ((0, half), (half, layers)))
    assert (parts == sums[:2]).all()
    dst = make_caches(layers, heads, dim, dtype, tokens, n_blocks + 3, layout, fill=False)
    dlay = cache_layout.from_tensors(dst, n_blocks + 3)
    back = cuda_kernels.scatter(dlay, ids, addrs, path=path)
    assert (back == sums).all(), f"{name}/{layout}/{path}: checksums of the scatter differ"
    for t_src, t_dst in zip(caches, dst, strict=True):
        sel = torch.as_tensor(ids, device=DEVICE)
        a = t_src[:, sel] if layout == "flash" else t_src[sel]
        b = t_dst[:, sel] if layout == "flash" else t_dst[sel]
        assert torch.equal(a, b), f"{name}/{layout}/{path}: scattered blocks differ"
    return bb


def check_staging_fallback(pool_mem, pool_dev_base):
    """No device memory for the copy buffer (planted): "auto" keeps to the direct path, byte-exact, and an
    explicit "staged" says why it cannot."""
    layers, heads, dim, dtype, tokens = GEOMETRIES["llama-3.1-8b"]
    if SIM:
        layers = 2
    caches = make_caches(layers, heads, dim, dtype, tokens, 6, "flash")
    lay = cache_layout.from_tensors(caches, 6)
    bb = lay.block_bytes
    ids = np.array([4, 1, 5], np.int64)
    addrs = pool_dev_base + np.arange(3, dtype=np.int64) * bb
    drv = cuda_kernels.driver()
    limits = staging.MIN_SPAN, staging.MIN_BYTES

    def no_memory(nbytes):
        raise MemoryError(f"out of memory for {nbytes} bytes (planted)")

    drv.alloc, staging.MIN_SPAN, staging.MIN_BYTES = no_memory, 0, 0  # "auto" would stage this batch
    try:
        pool_mem[:3 * bb] = 0
        sums = cuda_kernels.gather(lay, ids, addrs)
        for i, b in enumerate(ids):
            assert (pool_mem[i * bb:(i + 1) * bb] == block_bytes_ref(caches, "flash", int(b))).all()
            assert int(sums[i]) == int(cpu_kernels.checksum(pool_mem[i * bb:].ctypes.data, bb))
        try:
            cuda_kernels.scatter(lay, ids, addrs, path="staged")
        except RuntimeError as e:
            assert "planted" in str(e), e
        else:
            raise AssertionError("a staged copy without its buffer did not fail")
    finally:
        del drv.alloc
        staging.MIN_SPAN, staging.MIN_BYTES = limits


def check_connector_datapath():
    """The connector's GPU path on FlashAttention-shaped caches: register, gather, commit, lookup, scatter."""
    layers, heads, dim, dtype, tokens = GEOMETRIES["llama-3.1-8b"]
    if SIM:
        layers = 2
    fmt = KVFormat("llama-3.1-8b", "bfloat16", layers, heads, dim, tokens, "cuda", "check")
    path = f"/dev/shm/beluga-gpucheck-{uuid.uuid4().hex[:6]}"
    s = PoolSettings(path=[path], size=256 << 20, tcp_port=0, admin_port=0)
    svc = MetadataService(s, fmt)
    svc.start_thread()
    try:
        with PoolClient(s, fmt) as c:
            reg = cuda_kernels.Registration(c.base, c.mem.size)
            src = make_caches(layers, heads, dim, dtype, tokens, 16, "flash")
            lay = cache_layout.from_tensors(src, 16)
            assert lay.block_bytes == fmt.block_bytes
            keys = [f"gpu{i}".encode().ljust(32, b"\0") for i in range(6)]
            ids = np.array([3, 7, 1, 9, 4, 12], np.int64)
            got = c.alloc(keys)
            addrs = np.array([reg.device_addr(c.slot_addr(sl)) for sl, _ in got], np.int64)
            sums = cuda_kernels.gather(lay, ids, addrs)
            assert c.commit([(sl, g, int(x), k) for (sl, g), x, k in zip(got, sums, keys, strict=True)]) == 6
            hit = c.lookup(keys)
            assert len(hit) == 6
            dst = make_caches(layers, heads, dim, dtype, tokens, 16, "flash", fill=False)
            dlay = cache_layout.from_tensors(dst, 16)
            into = np.array([0, 2, 5, 6, 8, 15], np.int64)
            hit_addrs = np.array([reg.device_addr(c.slot_addr(x)) for x in hit.slots])
            back = cuda_kernels.scatter(dlay, into, hit_addrs)
            if not SIM:  # on the caller's stream (what the connector passes: torch's current one)
                with torch.cuda.stream(torch.cuda.Stream()):
                    again = cuda_kernels.scatter(dlay, into, hit_addrs, stream=torch.cuda.current_stream())
                assert (again == back).all()
            for k, (slot, gen) in enumerate(zip(hit.slots, hit.gens, strict=True)):
                assert int(back[k]) == c.expected(slot, gen, keys[k])  # key, generation and checksum
            for t_src, t_dst in zip(src, dst, strict=True):
                assert torch.equal(t_src[:, torch.as_tensor(ids, device=DEVICE)],
                                   t_dst[:, torch.as_tensor(into, device=DEVICE)])
            c.release(hit.slots)
            reg.close()
    finally:
        svc.close()
        for p in (path, path + ".bell", path + ".token"):
            if os.path.exists(p):
                os.unlink(p)


def main() -> int:
    t0 = time.time()
    counts = (1, 3) if SIM else (1, 16, 256)
    big = max(counts)
    per = max(g[0] * 2 * g[1] * g[2] * g[4] * (4 if g[3] == torch.float32 else 2) for g in GEOMETRIES.values())
    if SIM:
        per //= 16
    path = f"/dev/shm/beluga-gpucheck-raw-{uuid.uuid4().hex[:6]}"
    region = Region.create(path, big * per + (1 << 20))
    try:
        reg = cuda_kernels.Registration(region.base, region.size)
        dev_base = reg.device_addr(region.base)
        print(f"pool registered: device address = host address + {reg.offset:#x}", flush=True)
        for name, geo in GEOMETRIES.items():
            if SIM:
                geo = (2, *geo[1:])
            for layout in LAYOUTS:
                for n in counts:
                    # the simulator is slow: there the staged path (layout-blind) runs on one layout
                    both = not SIM or (layout == "flash" and n == big)
                    for copy_path in ("direct", "staged") if both else ("direct",):
                        check_kernels(name, geo, layout, n, region.mem, dev_base, copy_path)
                print(f"ok {name} {layout} ({'simulated' if SIM else torch.cuda.get_device_name()})", flush=True)
        check_staging_fallback(region.mem, dev_base)
        reg.close()
    finally:
        region.close()
        os.unlink(path)
    check_connector_datapath()
    print(f"ok connector GPU data path; all checks passed in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
