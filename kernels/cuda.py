"""GPU block copies between vLLM's paged KV cache (device memory) and pool slots (host memory, registered
and mapped into the GPU's address space), with numba-cuda.

One launch moves many blocks, all layers (or a range of layers, so that loading can overlap the forward
pass layer by layer). Each CUDA block copies one contiguous run with 16-byte loads and stores, so a warp
moves 512 contiguous bytes per instruction. The kernel either reads and writes the pool itself over PCIe
(the direct path: the least fixed cost, best for small pieces) or packs blocks in a small device buffer
that the copy engine moves (the staged path, `kernels.staging`: the higher PCIe rate for large copies).
The checksum is the same as the CPU kernels' (see `kernels.cpu`), reduced per CUDA block.

Under `NUMBA_ENABLE_CUDASIM=1` (CI has no GPU) the same kernels run on the CPU, addresses being host
addresses; there the 16-byte accesses fall back to two 8-byte ones.
"""
from __future__ import annotations

import ctypes

import numpy as np

if not hasattr(np, "row_stack"):  # numba-cuda 0.30.4 calls numpy.row_stack, removed in numpy 2.4
    np.row_stack = np.vstack

from numba import config, cuda, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from beluga.kernels import staging  # noqa: E402
from beluga.kernels.driver import Driver, SimDriver  # noqa: E402
from beluga.kernels.layout import CacheLayout  # noqa: E402

K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = np.uint64(0xBF58476D1CE4E5B9)
SIMULATED = bool(config.ENABLE_CUDASIM)
THREADS = 32 if SIMULATED else 128  # 128 with UNROLL 8 measured best of 128-1024 x 4-16 on an H200
CHUNK = 64 << 30  # cuMemHostRegister is done in pieces of at most 64 GiB

if SIMULATED:

    def ld2(addr):
        return (np.uint64(ctypes.c_uint64.from_address(int(addr)).value),
                np.uint64(ctypes.c_uint64.from_address(int(addr) + 8).value))

    def st2(addr, lo, hi):
        ctypes.c_uint64.from_address(int(addr)).value = int(lo)
        ctypes.c_uint64.from_address(int(addr) + 8).value = int(hi)

else:
    from llvmlite import ir

    _v2 = ir.VectorType(ir.IntType(64), 2)

    @intrinsic
    def ld2(typingctx, addr):
        """One 16-byte global load (ld.global.v2.u64)."""
        sig = types.UniTuple(types.uint64, 2)(types.int64)

        def codegen(context, builder, sig, args):
            v = builder.load(builder.inttoptr(args[0], ir.PointerType(_v2)), align=16)
            items = [builder.extract_element(v, ir.Constant(ir.IntType(32), i)) for i in range(2)]
            return context.make_tuple(builder, sig.return_type, items)

        return sig, codegen

    @intrinsic
    def st2(typingctx, addr, lo, hi):
        """One 16-byte global store (st.global.v2.u64)."""
        sig = types.void(types.int64, types.uint64, types.uint64)

        def codegen(context, builder, sig, args):
            v = ir.Constant(_v2, ir.Undefined)
            v = builder.insert_element(v, args[1], ir.Constant(ir.IntType(32), 0))
            v = builder.insert_element(v, args[2], ir.Constant(ir.IntType(32), 1))
            builder.store(v, builder.inttoptr(args[0], ir.PointerType(_v2)), align=16)
            return context.get_dummy_value()

        return sig, codegen


UNROLL = 8  # 16-byte words each thread has in flight per iteration: loads issued before stores
# A launch is split into at least this many CUDA blocks (runs cut into pieces of >= 2 KB): a few blocks
# move little data, and over PCIe each SM's share is latency-bound, so spread them over every SM.
TARGET_JOBS = 8 if SIMULATED else 1024  # the simulator runs each CUDA block as Python threads
PIECE_MIN = THREADS * 16
N_ARGS = 12

if SIMULATED:

    def ld1(addr):
        return np.int64(ctypes.c_int64.from_address(int(addr)).value)

    def st1(addr, value):
        ctypes.c_uint64.from_address(int(addr)).value = int(value)

else:

    @intrinsic
    def ld1(typingctx, addr):
        """One 8-byte global load."""
        sig = types.int64(types.int64)

        def codegen(context, builder, sig, args):
            return builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))), align=8)

        return sig, codegen

    @intrinsic
    def st1(typingctx, addr, value):
        """One 8-byte global store."""
        sig = types.void(types.int64, types.uint64)

        def codegen(context, builder, sig, args):
            builder.store(args[1], builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))), align=8)
            return context.get_dummy_value()

        return sig, codegen


@cuda.jit(device=True, inline=True)
def _mix(lo, hi, idx):
    return (lo ^ (idx * K1)) * K2 + (hi ^ ((idx + np.uint64(1)) * K1)) * K2


def _copy(meta, n_layers, n_runs, run_bytes, pieces, piece_bytes, layer_lo, layer_hi, req, partials, to_pool,
          slot0):
    """blockIdx.x enumerates (block i, layer l in [lo, hi), run r, piece p); threads stride over the
    piece's 16-byte words. Every argument is a number (arrays by address), so that a launch is one driver
    call with nothing for Python to convert.

    meta (device): bases[n_layers], block strides[n_layers], run offsets[n_layers * n_runs].
    req (mapped host memory): (block id, slot address) per block; read by one thread per CUDA block,
    since each read is a PCIe round trip (a device copy made before each launch measured slower). A
    one-block launch passes its block id in `req` and its slot address in `slot0` instead: no round trip.
    The checksum is reduced in shared memory and written once per CUDA block to `partials` (mapped host
    memory), with no atomics (atomics on host memory cross PCIe one by one)."""
    job = cuda.blockIdx.x
    q = job // pieces
    p = job - q * pieces
    per_block = (layer_hi - layer_lo) * n_runs
    i = q // per_block
    rem = q - i * per_block
    layer = layer_lo + rem // n_runs
    r = rem - (rem // n_runs) * n_runs
    addrs = cuda.shared.array(2, types.int64)
    red = cuda.shared.array(THREADS, types.uint64)
    tid = cuda.threadIdx.x
    start = p * piece_bytes
    pos = (layer * n_runs + r) * run_bytes + start
    if tid == 0:
        block_id = ld1(req + 16 * i) if slot0 == 0 else req
        addrs[0] = (ld1(meta + 8 * layer) + block_id * ld1(meta + 8 * (n_layers + layer))
                    + ld1(meta + 8 * (2 * n_layers + layer * n_runs + r)) + start)
        addrs[1] = (ld1(req + 16 * i + 8) if slot0 == 0 else slot0) + pos
    cuda.syncthreads()
    src = addrs[0] if to_pool else addrs[1]
    dst = addrs[1] if to_pool else addrs[0]
    word0 = np.uint64(pos // 8)
    nw = min(piece_bytes, run_bytes - start) // 16
    acc = np.uint64(0)
    lo = cuda.local.array(UNROLL, types.uint64)
    hi = cuda.local.array(UNROLL, types.uint64)
    for base in range(tid, nw, THREADS * UNROLL):
        for u in range(UNROLL):  # all loads in flight before the first store
            w = base + u * THREADS
            if w < nw:
                lo[u], hi[u] = ld2(src + w * 16)
        for u in range(UNROLL):
            w = base + u * THREADS
            if w < nw:
                st2(dst + w * 16, lo[u], hi[u])
                acc += _mix(lo[u], hi[u], word0 + np.uint64(2 * w))
    red[tid] = acc
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            red[tid] += red[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        st1(partials + 8 * job, red[0])


_compiled = None


def _kernel():
    """`_copy` compiled for its one signature (all int64), on first use: importing this module must work
    on machines without a GPU (the CPU tests import it)."""
    global _compiled
    if _compiled is None:
        _compiled = cuda.jit("void(" + ", ".join(["int64"] * N_ARGS) + ")")(_copy)
    return _compiled


def split(n_runs: int, run_bytes: int) -> tuple[int, int]:
    """(pieces per run, bytes per piece): a launch of n_runs runs becomes about TARGET_JOBS CUDA blocks."""
    pieces = max(1, min(-(-TARGET_JOBS // max(n_runs, 1)), run_bytes // PIECE_MIN))
    piece_bytes = (-(-run_bytes // pieces) + 15) // 16 * 16  # ceil(run / pieces), rounded up to 16 bytes
    return -(-run_bytes // piece_bytes), piece_bytes


class _Mapped:
    """Host memory the GPU reads and writes in place (pinned, mapped): a numpy view and its device
    address `dev`; and `mirror`, the address of as many bytes of device memory, for launches that must not
    wait on PCIe round trips (see `Launcher.enqueue`). Under the simulator: plain host memory."""

    def __init__(self, shape, dtype):
        if SIMULATED:
            self.host = np.zeros(shape, dtype)
            self.dev = self.host.ctypes.data
            self._mirror = np.zeros(shape, dtype)
            self.mirror = self._mirror.ctypes.data
        else:
            self._keep = cuda.mapped_array(shape, dtype)
            self.host = np.asarray(self._keep).view(np.ndarray)
            self.dev = int(self._keep.device_ctypes_pointer.value)
            self._mirror = cuda.device_array(shape, dtype)
            self.mirror = int(self._mirror.device_ctypes_pointer.value)


def _stream_handle(stream) -> int:
    """A CUDA stream given as a handle (int), a numba stream, a torch stream, or 0 (the default)."""
    if not stream:
        return 0
    if isinstance(stream, int):
        return stream
    if hasattr(stream, "cuda_stream"):  # torch
        return int(stream.cuda_stream)
    h = stream.handle
    return int(getattr(h, "value", None) or int(h) or 0)


_driver = None


def driver():
    """The driver calls (ctypes on a GPU, stand-ins under the simulator), made on first use."""
    global _driver
    if _driver is None:
        if SIMULATED:
            _driver = SimDriver(_kernel(), THREADS)
        else:
            kernel = next(iter(_kernel().overloads.values()))
            handle = kernel._codelibrary.get_cufunc().handle
            _driver = Driver(int(getattr(handle, "value", None) or int(handle)), THREADS)
    return _driver


# argument positions of _copy
(A_META, A_LAYERS, A_RUNS, A_RUN_BYTES, A_PIECES, A_PIECE_BYTES, A_LO, A_HI, A_REQ, A_PARTIALS, A_TO_POOL,
 A_SLOT0) = range(N_ARGS)


class Launcher:
    """Per-layout launch state kept across calls, so that a launch is a few stores and one driver call:
    the layout's arrays live on the device; block ids, slot addresses and per-CUDA-block checksum
    partials go through mapped (zero-copy) host memory; the kernel's arguments sit in a ctypes array whose
    constant entries are written once. Launches only queue work: the caller synchronizes."""

    def __init__(self, layout: CacheLayout):
        if layout.run_bytes % 16:
            raise ValueError(f"runs of {layout.run_bytes} bytes are not a multiple of 16")
        self.layout = layout
        meta = np.concatenate([layout.bases, layout.block_stride, layout.runs.ravel()]).astype(np.int64)
        if SIMULATED:
            self._meta = meta
            meta_addr = meta.ctypes.data
        else:
            self._meta = cuda.to_device(meta)
            meta_addr = int(self._meta.device_ctypes_pointer.value)
        self.args = (ctypes.c_int64 * N_ARGS)()
        self.params = (ctypes.c_void_p * N_ARGS)(*[ctypes.addressof(self.args) + 8 * k for k in range(N_ARGS)])
        self.args[A_META], self.args[A_LAYERS] = meta_addr, layout.layers
        self.args[A_RUNS], self.args[A_RUN_BYTES] = layout.runs.shape[1], layout.run_bytes
        self.layers = layout.layers
        self.layer_bytes = layout.runs.shape[1] * layout.run_bytes
        self.req = self.partials = None
        self._plans: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        self.staging = None  # kernels.staging.Staging, made on the first copy that goes through it ...
        self.staging_error: str | None = None  # ... unless the device had no memory for it
        self.driver = driver()
        self.reserve(64, TARGET_JOBS * 4)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """(offset, bytes) of layers [lo, hi) within a pool block."""
        return lo * self.layer_bytes, (hi - lo) * self.layer_bytes

    def plan(self, n: int, lo: int, hi: int, whole_runs: bool = False) -> tuple[int, int, int]:
        """(CUDA blocks, pieces per run, bytes per piece) of a launch of n blocks over layers [lo, hi).
        `whole_runs`: one CUDA block a run (device-to-device copies need no spreading over the SMs, and
        every block then has the same number of checksum partials)."""
        key = (n, lo, hi, whole_runs)
        p = self._plans.get(key)
        if p is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            runs = n * (hi - lo) * self.layout.runs.shape[1]
            pieces, piece_bytes = (1, self.layout.run_bytes) if whole_runs else split(runs, self.layout.run_bytes)
            p = self._plans[key] = (runs * pieces, pieces, piece_bytes)
        return p

    def reserve(self, n: int, jobs: int) -> None:
        """Room for n (block id, address) rows and `jobs` checksum partials."""
        if self.req is None or n > self.req.host.shape[0]:
            self.req = _Mapped((max(n, 2 * (self.req.host.shape[0] if self.req else 0)), 2), np.int64)
        if self.partials is None or jobs > self.partials.host.shape[0]:
            self.partials = _Mapped(max(jobs, 2 * (self.partials.host.shape[0] if self.partials else 0)), np.uint64)

    def rows(self, block_ids, addrs) -> None:
        n = len(block_ids)
        self.req.host[:n, 0] = block_ids
        self.req.host[:n, 1] = addrs

    def enqueue(self, row0: int, n: int, lo: int, hi: int, to_pool: bool, stream: int, job0: int,
                single: tuple[int, int] | None = None, mirrored: bool = False) -> int:
        """Queue the copy of rows [row0, row0 + n) on `stream` (or of the one block `single` = (block id,
        address), passed in the launch itself); partials go to [job0, job0 + grid). Returns the grid.

        `mirrored`: rows and partials in device memory (`upload_rows` before, `download_sums` after). Each
        CUDA block reads its row once, and from mapped host memory that read is a PCIe round trip; the
        staged path needs this, since there the copy engine fills the link and round trips crawl; it also
        copies whole runs (see `plan`)."""
        grid, pieces, piece_bytes = self.plan(n, lo, hi, mirrored)
        a = self.args
        if single is None:
            a[A_REQ] = (self.req.mirror if mirrored else self.req.dev) + 16 * row0
            a[A_SLOT0] = 0
        else:
            a[A_REQ], a[A_SLOT0] = single
        a[A_PIECES] = pieces
        a[A_PIECE_BYTES] = piece_bytes
        a[A_LO] = lo
        a[A_HI] = hi
        a[A_TO_POOL] = to_pool
        a[A_PARTIALS] = (self.partials.mirror if mirrored else self.partials.dev) + 8 * job0
        self.driver.launch(grid, a, self.params, stream)
        return grid

    def upload_rows(self, n: int, stream: int) -> None:
        self.driver.copy(self.req.mirror, self.req.dev, 16 * n, stream)

    def download_sums(self, jobs: int, stream: int) -> None:
        self.driver.copy(self.partials.dev, self.partials.mirror, 8 * jobs, stream)

    def sums(self, job0: int, n: int, grid: int) -> np.ndarray:
        """Per-block checksums of a finished launch."""
        part = self.partials.host[job0:job0 + grid]
        if n == 1:
            return np.add.reduce(part, dtype=np.uint64, keepdims=True)
        return np.add.reduce(part.reshape(n, -1), axis=1, dtype=np.uint64)


def direct(launcher: Launcher, block_ids, addrs, to_pool: bool, lo: int, hi: int, stream: int) -> np.ndarray:
    """One launch: the kernel reads or writes the pool itself, over PCIe. A one-block copy (the common case
    when loading layer by layer, and what a short prompt's tail costs) passes its block in the launch."""
    n = len(block_ids)
    grid = launcher.plan(n, lo, hi)[0]
    launcher.reserve(n, grid)
    if n == 1:
        launcher.enqueue(0, 1, lo, hi, to_pool, stream, 0, (int(block_ids[0]), int(addrs[0])))
    else:
        launcher.rows(block_ids, addrs)
        launcher.enqueue(0, n, lo, hi, to_pool, stream, 0)
    launcher.driver.sync(stream)
    return launcher.sums(0, n, grid)


_launchers: dict[int, Launcher] = {}
MAX_LAYOUTS = 8
PATHS = ("auto", "direct", "staged")


def _launcher(layout: CacheLayout) -> Launcher:
    while len(_launchers) >= MAX_LAYOUTS:  # a layout's launcher holds device memory: keep the recent ones
        del _launchers[next(iter(_launchers))]
    launcher = _launchers[id(layout)] = Launcher(layout)
    return launcher


def _launch(layout: CacheLayout, block_ids, slot_addrs, to_pool: bool, layers, stream, path: str) -> np.ndarray:
    launcher = _launchers.get(id(layout))
    if launcher is None or launcher.layout is not layout:
        launcher = _launcher(layout)
    if layers is None:
        lo, hi = 0, launcher.layers
    else:
        lo, hi = layers
        if not 0 <= lo < hi <= launcher.layers:
            raise ValueError(f"layers {lo}..{hi} outside the cache's 0..{launcher.layers}")
    n = len(block_ids)
    if n == 0:
        return np.zeros(0, np.uint64)
    if path == "auto":
        worth_it = staging.worth_it(n, launcher.span(lo, hi)[1])
        path = "staged" if worth_it and staging.buffer(launcher) is not None else "direct"
    elif path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    run = direct if path == "direct" else staging.staged
    return run(launcher, block_ids, slot_addrs, to_pool, lo, hi, _stream_handle(stream))


def gather(layout: CacheLayout, block_ids, slot_addrs, layers=None, stream=0, path="auto") -> np.ndarray:
    """GPU cache -> pool slots (device addresses of the mapped pool). Returns per-block partial checksums
    (over the layers copied; add the partials of all layer ranges for a whole block). `stream`: a CUDA
    stream (handle, numba or torch stream; torch's current one in the connector); returns once the copy
    on it is done. `path`: "direct" (the kernel writes the pool over PCIe), "staged" (the kernel packs
    blocks in device memory, the copy engine moves them; see `kernels.staging`), or "auto" (staged where
    `staging.worth_it`)."""
    return _launch(layout, block_ids, slot_addrs, True, layers, stream, path)


def scatter(layout: CacheLayout, block_ids, slot_addrs, layers=None, stream=0, path="auto") -> np.ndarray:
    """Pool slots -> GPU cache; returns the checksums of what was read."""
    return _launch(layout, block_ids, slot_addrs, False, layers, stream, path)


class Registration:
    """The pool's memory registered with CUDA (portable, device-mapped), in pieces of at most 64 GiB.

    Idempotent: memory already registered (by us or another library) is used as it is. `device_addr`
    maps a host address in the pool to the address a kernel uses.
    """

    def __init__(self, host_addr: int, nbytes: int):
        self.host_addr, self.nbytes = host_addr, nbytes
        self.pieces: list[int] = []
        self.offset = 0
        if SIMULATED:
            return
        from cuda.bindings import driver as cu

        cuda.current_context()  # the driver API needs a current (primary) context, the one torch shares
        flags = cu.CU_MEMHOSTREGISTER_PORTABLE | cu.CU_MEMHOSTREGISTER_DEVICEMAP
        for start in range(0, nbytes, CHUNK):
            size = min(CHUNK, nbytes - start)
            (err,) = cu.cuMemHostRegister(host_addr + start, size, flags)
            if err == cu.CUresult.CUDA_SUCCESS:
                self.pieces.append(host_addr + start)
            elif err != cu.CUresult.CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED:
                self.close()
                raise RuntimeError(f"cuMemHostRegister of {size} bytes at {host_addr + start:#x} failed: {err}")
        err, dptr = cu.cuMemHostGetDevicePointer(host_addr, 0)
        if err != cu.CUresult.CUDA_SUCCESS:
            self.close()
            raise RuntimeError(f"cuMemHostGetDevicePointer failed: {err}")
        self.offset = int(dptr) - host_addr

    def device_addr(self, host_addr: int) -> int:
        return host_addr + self.offset

    def close(self) -> None:
        if SIMULATED:
            return
        from cuda.bindings import driver as cu

        for p in self.pieces:
            cu.cuMemHostUnregister(p)
        self.pieces = []
