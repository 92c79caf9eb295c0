"""Moving blocks between an engine's KV cache and pool slots: CPU kernels for vLLM's CPU backend, CUDA
kernels (pool registered with the GPU) for CUDA backends. The connector speaks only to this."""

from __future__ import annotations

import numpy as np

from beluga.cxlpool.client import PoolClient
from beluga.kernels import cpu as cpu_kernels
from beluga.kernels.layout import CacheLayout


class DataPath:
    def __init__(self, client: PoolClient, layout: CacheLayout, on_gpu: bool):
        self.client, self.layout, self.on_gpu = client, layout, on_gpu
        self.reg = None
        if on_gpu:
            from beluga.kernels import cuda as cuda_kernels

            self._cuda = cuda_kernels
            self.reg = cuda_kernels.Registration(client.base, client.mem.size)
        else:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load from numba's cache) both kernels now, with no blocks: otherwise the first
        request that hits the pool pays for it in its time to first token."""
        none = np.zeros(0, np.int64)
        for kernel in (cpu_kernels.gather, cpu_kernels.scatter):
            self._cpu(kernel, none, none)

    def _cpu(self, kernel, ids: np.ndarray, addrs: np.ndarray) -> np.ndarray:
        sums = np.zeros(len(ids), np.uint64)
        lay = self.layout
        kernel(lay.bases, lay.block_stride, lay.runs, lay.run_bytes, ids, addrs, sums)
        return sums

    def _addrs(self, slots: list[int]) -> np.ndarray:
        addrs = [self.client.slot_addr(s) for s in slots]
        if self.reg is not None:
            addrs = [self.reg.device_addr(a) for a in addrs]
        return np.array(addrs, np.int64)

    def _stream(self) -> int:
        """The engine's own CUDA stream (torch's current one), so copies order with its kernels."""
        import torch

        return int(torch.cuda.current_stream().cuda_stream)

    def save(self, block_ids: list[int], slots: list[int], stream=None) -> np.ndarray:
        """Engine blocks -> slots (visible to others when this returns); per-block checksums."""
        ids, addrs = np.asarray(block_ids, np.int64), self._addrs(slots)
        if self.on_gpu:
            sums = self._cuda.gather(self.layout, ids, addrs, stream=stream or self._stream())
        else:
            sums = self._cpu(cpu_kernels.gather, ids, addrs)
        for s in slots:
            self.client.coh.wrote_externally(self.client.slot_offset(s), self.client.fmt.block_bytes)
        return sums

    def load(self, slots: list[int], block_ids: list[int], stream=None) -> np.ndarray:
        """Slots -> engine blocks; checksums of what was read."""
        for s in slots:
            self.client.coh.before_external_read(self.client.slot_offset(s), self.client.fmt.block_bytes)
        ids, addrs = np.asarray(block_ids, np.int64), self._addrs(slots)
        if self.on_gpu:
            return self._cuda.scatter(self.layout, ids, addrs, stream=stream or self._stream())
        return self._cpu(cpu_kernels.scatter, ids, addrs)

    def close(self) -> None:
        if self.reg is not None:
            self.reg.close()
