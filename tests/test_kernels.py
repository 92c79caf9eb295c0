"""Kernels: CPU gather/scatter directly; CUDA kernels through numba's simulator (CI has no GPU: the
simulator stands in for the device; tests/gpu_checks.py runs the same checks on a real GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gpu_checks import GEOMETRIES, block_bytes_ref

from beluga.kernels import cpu, layout, staging

pytestmark = pytest.mark.timeout(300)


def caches(layers, heads, dim, dtype, tokens, nb, kind, zero=False):
    shape = {"flash": (2, nb, tokens, heads, dim), "flashinfer": (nb, 2, tokens, heads, dim),
             "cpu": (nb, heads, tokens, 2 * dim)}[kind]
    torch.manual_seed(0)
    return [torch.zeros(shape, dtype=dtype) if zero else torch.randn(shape).to(dtype) for _ in range(layers)]


@pytest.mark.parametrize("geo", list(GEOMETRIES))
@pytest.mark.parametrize("kind", ["cpu", "flash", "flashinfer"])
def test_cpu_gather_scatter_byte_exact(geo, kind):
    layers, heads, dim, dtype, tokens = GEOMETRIES[geo]
    nb = 6
    src = caches(layers, heads, dim, dtype, tokens, nb, kind)
    lay = layout.from_tensors(src, nb)
    assert lay.block_bytes == layers * 2 * tokens * heads * dim * src[0].element_size()
    ids = np.array([4, 1, 5], np.int64)
    pool = np.zeros((3, lay.block_bytes), np.uint8)
    addrs = np.array([pool[i].ctypes.data for i in range(3)], np.int64)
    sums = np.zeros(3, np.uint64)
    cpu.gather(lay.bases, lay.block_stride, lay.runs, lay.run_bytes, ids, addrs, sums)
    for i, b in enumerate(ids):
        assert (pool[i] == block_bytes_ref(src, kind, int(b))).all()
        assert int(sums[i]) == int(cpu.checksum(pool[i].ctypes.data, lay.block_bytes))
    dst = caches(layers, heads, dim, dtype, tokens, nb, kind, zero=True)
    dlay = layout.from_tensors(dst, nb)
    back = np.zeros(3, np.uint64)
    cpu.scatter(dlay.bases, dlay.block_stride, dlay.runs, dlay.run_bytes, ids, addrs, back)
    assert (back == sums).all()
    for s, d in zip(src, dst, strict=True):
        sel = torch.as_tensor(ids)
        assert torch.equal(s[:, sel] if kind == "flash" else s[sel], d[:, sel] if kind == "flash" else d[sel])
    untouched = [i for i in range(nb) if i not in ids]
    assert all(not d[:, untouched].any() if kind == "flash" else not d[untouched].any() for d in dst)


def test_checksum_is_position_sensitive():
    a = np.arange(512, dtype=np.uint64)
    b = a.copy()
    b[[3, 300]] = b[[300, 3]]  # same words, two swapped
    assert cpu.checksum(a.ctypes.data, a.nbytes) != cpu.checksum(b.ctypes.data, b.nbytes)


def test_layouts_that_cannot_be_described_are_refused():
    with pytest.raises(layout.LayoutError, match="no dimension of size 7"):
        layout.from_tensors([torch.zeros(4, 3, 2)], 7)
    with pytest.raises(layout.LayoutError, match="layers differ"):
        layout.from_tensors([torch.zeros(4, 3, 16), torch.zeros(4, 3, 8)], 4)


@pytest.mark.timeout(480)
def test_cuda_kernels_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "tests/gpu_checks.py"], env=env, capture_output=True, text=True, timeout=450)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "all checks passed" in r.stdout and r.stdout.count("ok ") == 10


@pytest.mark.parametrize("n,per", [(1, 1), (3, 1), (5, 43), (16, 15), (100, 8), (256, 15), (256, 43), (300, 43)])
def test_staged_chunks_cover_the_batch_and_fit_a_half(n, per):
    chunks = staging._chunks(n, per)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a < b <= a + per for a, b in chunks)
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
    if n >= 4 * per >= 32:  # large batches start and end small (the parts that cannot overlap)
        sizes = [b - a for a, b in chunks]
        assert sizes[0] == per // 8 and sizes[-1] == per // 8 and max(sizes) == per


def test_staged_copies_merge_adjacent_slots_only():
    span = 100
    pool = np.array([0, 100, 200, 500, 400, 600, 700], np.int64)
    assert list(staging._copies(pool, 0, 7, span)) == [(0, 3), (3, 1), (4, 1), (5, 2)]
    assert list(staging._copies(pool, 1, 4, span)) == [(1, 2), (3, 1)]


def test_auto_stages_only_large_batches_of_large_spans():
    assert staging.worth_it(256, 2 << 20)  # 256 Llama blocks
    assert not staging.worth_it(16, 2 << 20)  # 32 MB: the direct kernel's lower fixed cost wins
    assert not staging.worth_it(4096, 64 << 10)  # one layer at a time: pieces too small for the copy engine
