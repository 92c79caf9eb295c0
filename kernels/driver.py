"""The few CUDA driver calls the block copies make, through ctypes, and their stand-ins under numba's
simulator.

Through ctypes because numba's own launch path converts and checks every argument on each call (~100 us),
more than a one-block copy takes, and because numba has no handle on torch's streams. Under
`NUMBA_ENABLE_CUDASIM=1` (CI has no GPU) "device memory" is host memory: copies are `memmove`, streams and
events are no-ops (everything runs in program order), and kernels run in numba's simulator.
"""

from __future__ import annotations

import ctypes

import numpy as np

CU_STREAM_NON_BLOCKING = 1
CU_EVENT_DISABLE_TIMING = 2


class CudaError(RuntimeError):
    pass


class Driver:
    """libcuda's entry points for launches, copies on the copy engine, streams and events."""

    def __init__(self, func: int, threads: int):
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        # The launch and the synchronize are on a one-block copy's critical path: their arguments are
        # ctypes objects made once (no argtypes, so ctypes converts nothing per call; ~1 us saved).
        self._launch = lib.cuLaunchKernel
        self._sync = lib.cuStreamSynchronize
        self._func, self._threads, self._one, self._zero = vp(func), u(threads), u(1), u(0)
        self._grid, self._stream = u(), vp()
        self._copy = lib.cuMemcpyAsync  # unified addressing: the direction follows from the pointers
        self._copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, vp]
        self._record = lib.cuEventRecord
        self._record.argtypes = [vp, vp]
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [vp, vp, u]
        self._lib = lib

    @staticmethod
    def _check(err: int, what: str) -> None:
        if err != 0:
            raise CudaError(f"CUDA error {err} in {what}")

    def launch(self, grid: int, args, params, stream: int) -> None:
        self._grid.value, self._stream.value = grid, stream
        one = self._one
        err = self._launch(self._func, self._grid, one, one, self._threads, one, one, self._zero, self._stream,
                           params, None)
        if err:
            self._check(err, "the block-copy kernel's launch")

    def sync(self, stream: int) -> None:
        self._stream.value = stream
        err = self._sync(self._stream)
        if err:
            self._check(err, "the block-copy kernel")

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self._copy(dst, src, nbytes, stream), "cuMemcpyAsync")

    def stream(self) -> int:
        h = ctypes.c_void_p()
        self._check(self._lib.cuStreamCreate(ctypes.byref(h), ctypes.c_uint(CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
        return int(h.value)

    def event(self) -> int:
        h = ctypes.c_void_p()
        self._check(self._lib.cuEventCreate(ctypes.byref(h), ctypes.c_uint(CU_EVENT_DISABLE_TIMING)), "cuEventCreate")
        return int(h.value)

    def record(self, event: int, stream: int) -> None:
        """Mark what `stream` has queued so far ..."""
        self._check(self._record(event, stream), "cuEventRecord")

    def wait(self, stream: int, event: int) -> None:
        """... and have `stream` run what is queued on it next only once that is done."""
        self._check(self._wait(stream, event, 0), "cuStreamWaitEvent")

    def alloc(self, nbytes: int):
        """Device memory: (owner to keep alive, address)."""
        from numba import cuda

        arr = cuda.device_array(nbytes, np.uint8)
        return arr, int(arr.device_ctypes_pointer.value)


class SimDriver:
    """The same calls under numba's CUDA simulator, in program order on the CPU."""

    def __init__(self, kernel, threads: int):
        self.kernel, self.threads = kernel, threads

    def launch(self, grid: int, args, params, stream: int) -> None:
        self.kernel[grid, self.threads](*args)

    def sync(self, stream: int) -> None:
        pass

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def stream(self) -> int:
        return 0

    def event(self) -> int:
        return 0

    def record(self, event: int, stream: int) -> None:
        pass

    def wait(self, stream: int, event: int) -> None:
        pass

    def alloc(self, nbytes: int):
        arr = np.zeros(nbytes, np.uint8)
        return arr, arr.ctypes.data
