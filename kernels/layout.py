"""Where each block of an engine's paged KV cache lies in memory, read from the tensors themselves.

vLLM keeps one cache tensor per layer. Whatever the attention backend (CPU: [blocks, heads, tokens,
2*head_dim]; FlashAttention: [2, blocks, tokens, heads, head_dim]; FlashInfer: [blocks, 2, tokens, heads,
head_dim]; or a stride-permuted view of these), one block of one layer is a few contiguous runs at fixed
offsets from the block's start. A pool block is those runs, layer after layer. Reading shape and strides
(rather than trusting a backend name) keeps the copy right when a backend permutes its strides.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


class LayoutError(ValueError):
    """The cache tensors cannot be described as blocks of equal contiguous runs."""


@dataclass(frozen=True)
class CacheLayout:
    bases: np.ndarray  # int64 [layers]: address of block 0 of each layer's cache
    block_stride: np.ndarray  # int64 [layers]: bytes from one block to the next
    runs: np.ndarray  # int64 [layers, runs]: byte offsets of a block's runs from its start
    run_bytes: int
    num_blocks: int
    signature: str  # shape/stride pattern, identical for engines whose blocks are interchangeable

    @property
    def block_bytes(self) -> int:
        return int(self.runs.size * self.run_bytes)

    @property
    def layers(self) -> int:
        return int(self.runs.shape[0])


def _describe(t) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(address, shape, strides in bytes, element size) of a torch tensor or numpy array."""
    if hasattr(t, "data_ptr"):
        es = t.element_size()
        return int(t.data_ptr()), tuple(t.shape), tuple(s * es for s in t.stride()), es
    return int(t.ctypes.data), tuple(t.shape), tuple(t.strides), t.itemsize


def _runs(shape, strides, elem, block_dim) -> tuple[list[int], int]:
    dims = [(n, s) for d, (n, s) in enumerate(zip(shape, strides, strict=True)) if d != block_dim and n > 1]
    dims.sort(key=lambda x: -x[1])
    run = elem
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    offsets = [sum(i * s for i, (_, s) in zip(idx, dims, strict=True))
               for idx in itertools.product(*(range(n) for n, _ in dims))]
    return offsets, run


def from_tensors(tensors: list, num_blocks: int, block_dim: int | None = None) -> CacheLayout:
    """Describe per-layer cache tensors; the block dimension is the one of size num_blocks."""
    if not tensors:
        raise LayoutError("no KV cache tensors")
    bases, strides, all_runs, run_bytes, sig = [], [], [], None, None
    for t in tensors:
        addr, shape, st, elem = _describe(t)
        bd = block_dim
        if bd is None:
            found = [d for d, n in enumerate(shape) if n == num_blocks]
            if not found:
                raise LayoutError(f"no dimension of size {num_blocks} (blocks) in cache of shape {shape}")
            bd = found[0]
        offsets, run = _runs(shape, st, elem, bd)
        if run_bytes is None:
            run_bytes = run
            sig = f"{shape[:bd] + ('B',) + shape[bd + 1:]}/{st}"
        elif run != run_bytes or len(offsets) != len(all_runs[0]):
            raise LayoutError(f"layers differ in layout: {shape}/{st} vs the first layer's {sig}")
        bases.append(addr)
        strides.append(st[bd])
        all_runs.append(offsets)
    return CacheLayout(np.array(bases, np.int64), np.array(strides, np.int64), np.array(all_runs, np.int64),
                       int(run_bytes), num_blocks, sig)
