"""Machine-level primitives for a pool that other processes (or hosts) map at the same time.

Everything that touches shared words or flushes cache lines lives here, compiled by numba. Plain numba
array reads in a polling loop are hoisted out of the loop by LLVM (it cannot know another process writes
the word), so flags use atomic acquire loads and release stores. On non-coherent CXL memory a writer must
push its lines to memory (non-temporal stores, or `clflushopt` + `sfence`) and a reader must drop its own
stale lines (`clflushopt` before reading); these sequences are emitted here as real instructions.

All functions take raw addresses (int64) so one compiled function serves the pool, numpy arrays and
torch CPU tensors alike.
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from beluga.cxlpool.protocol import (
    W_ARGS,
    W_OPN,
    W_PLEN,
    W_REQ_SEQ,
    W_RESP_SEQ,
    W_RESP_TOKEN,
    W_RET,
    W_RLEN,
    W_STATUS,
    W_TOKEN,
)

# numba's JIT cannot emit inline assembly (clflushopt, sfence) until LLVM's asm parser is loaded.
llvm.initialize_native_asmparser()

CACHE_LINE = 64

_i64 = ir.IntType(64)
_i32 = ir.IntType(32)
_i8 = ir.IntType(8)


def _ptr(builder, addr, bits=64):
    return builder.inttoptr(addr, ir.PointerType(ir.IntType(bits)))


@intrinsic
def load_acquire(typingctx, addr):
    """Atomic 64-bit load with acquire ordering (never hoisted out of a loop)."""
    sig = types.uint64(types.int64)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_ptr(builder, args[0]), "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, addr, value):
    """Atomic 64-bit store with release ordering: everything written before it is visible first."""
    sig = types.void(types.int64, types.uint64)

    def codegen(context, builder, sig, args):
        builder.store_atomic(args[1], _ptr(builder, args[0]), "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def compare_swap(typingctx, addr, expected, value):
    """Atomic 64-bit compare-and-swap; returns the value found (== expected on success)."""
    sig = types.uint64(types.int64, types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        res = builder.cmpxchg(_ptr(builder, args[0]), args[1], args[2], "acq_rel", "monotonic")
        return builder.extract_value(res, 0)

    return sig, codegen


def _asm_void(text: str, with_addr: bool):
    """An intrinsic that emits one instruction, optionally on the cache line at an address."""

    if with_addr:

        @intrinsic
        def emit(typingctx, addr):
            sig = types.void(types.int64)

            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(_i8)])
                p = builder.inttoptr(args[0], ir.PointerType(_i8))
                builder.asm(fnty, text + " ($0)", "r,~{memory}", [p], side_effect=True)
                return context.get_dummy_value()

            return sig, codegen

    else:

        @intrinsic
        def emit(typingctx):
            sig = types.void()

            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.VoidType(), [])
                builder.asm(fnty, text, "~{memory}", [], side_effect=True)
                return context.get_dummy_value()

            return sig, codegen

    return emit


clflushopt = _asm_void("clflushopt", with_addr=True)
sfence = _asm_void("sfence", with_addr=False)
mfence = _asm_void("mfence", with_addr=False)


@njit(cache=True, nogil=True, inline="always")
def _clflush_lines(addr, nbytes):
    a = addr & ~(CACHE_LINE - 1)
    while a < addr + nbytes:
        clflushopt(a)
        a += CACHE_LINE


@njit(cache=True, nogil=True)
def flush_range(addr, nbytes):
    """Write back and drop every cache line of [addr, addr+nbytes), then order it (sfence)."""
    _clflush_lines(addr, nbytes)
    sfence()


@njit(cache=True, nogil=True)
def invalidate_range(addr, nbytes):
    """Drop this core's copies of [addr, addr+nbytes) before reading what another host wrote; the full
    fence keeps the reads that follow from passing the flushes."""
    _clflush_lines(addr, nbytes)
    mfence()


@njit(cache=True, nogil=True)
def full_fence():
    mfence()


@njit(cache=True, nogil=True)
def store_fence():
    sfence()


@njit(cache=True, nogil=True)
def wait_for_value(addr, want, spins):
    """Spin (at most `spins` loads) until the word at addr equals want; True if it did."""
    for _ in range(spins):
        if load_acquire(addr) == want:
            return True
    return False


@njit(cache=True, nogil=True)
def poll_requests(base, stride, n, seen, spins):
    """Server side: index of a client whose request word differs from what we answered, or -1."""
    for _ in range(spins):
        for c in range(n):
            if load_acquire(base + c * stride) != seen[c]:
                return c
    return -1


def address(arr) -> int:
    """Raw address of a numpy array's (or torch CPU tensor's) first element."""
    if hasattr(arr, "data_ptr"):
        return int(arr.data_ptr())
    return int(arr.ctypes.data)


@njit(cache=True, nogil=True)
def atomic_load(addr):
    """Python-callable acquire load of a shared 64-bit word."""
    return load_acquire(addr)


@njit(cache=True, nogil=True)
def atomic_cas(addr, expected, value):
    """Python-callable compare-and-swap of a shared 64-bit word; returns the value found."""
    return compare_swap(addr, expected, value)


@njit(cache=True, nogil=True)
def atomic_store(addr, value):
    """Python-callable release store of a shared 64-bit word."""
    store_release(addr, value)


# -- RPC slot words: their layout is `protocol`'s. --------------------------------------------------------


@njit(cache=True, nogil=True)
def client_call(slot, opn, token, a0, a1, a2, a3, plen, seq, spins, out):
    """Write a request into the client's RPC slot, publish it, spin for the answer. One Python call per
    round trip (each extra call from Python costs about as much as the whole exchange). True when the
    reply to this very request (its sequence and token) arrived; then out holds it (see `read_reply`)."""
    store_release(slot + W_OPN * 8, opn)
    store_release(slot + W_TOKEN * 8, token)
    store_release(slot + W_ARGS * 8, a0)
    store_release(slot + (W_ARGS + 1) * 8, a1)
    store_release(slot + (W_ARGS + 2) * 8, a2)
    store_release(slot + (W_ARGS + 3) * 8, a3)
    store_release(slot + W_PLEN * 8, plen)
    store_release(slot + W_REQ_SEQ * 8, seq)
    for _ in range(spins):
        if load_acquire(slot + W_RESP_SEQ * 8) == seq:
            read_reply(slot, out)
            return True
    return False


@njit(cache=True, nogil=True)
def read_reply(slot, out):
    """out: status|n<<32, ret[4], reply length, the sequence and the token the reply answers."""
    out[6] = load_acquire(slot + W_RESP_SEQ * 8)
    out[0] = load_acquire(slot + W_STATUS * 8)
    for k in range(4):
        out[1 + k] = load_acquire(slot + (W_RET + k) * 8)
    out[5] = load_acquire(slot + W_RLEN * 8)
    out[7] = load_acquire(slot + W_RESP_TOKEN * 8)


@njit(cache=True, nogil=True)
def server_read(slot, out):
    """The request words of one client's slot: seq, token, op|n<<32, args[4], payload length."""
    out[0] = load_acquire(slot + W_REQ_SEQ * 8)
    for k in range(1, 8):
        out[k] = load_acquire(slot + k * 8)


@njit(cache=True, nogil=True)
def server_reply(slot, status_n, r0, r1, r2, r3, rlen, token, seq):
    """Write the answer words, then release the sequence number the client waits for."""
    store_release(slot + W_STATUS * 8, status_n)
    store_release(slot + W_RET * 8, r0)
    store_release(slot + (W_RET + 1) * 8, r1)
    store_release(slot + (W_RET + 2) * 8, r2)
    store_release(slot + (W_RET + 3) * 8, r3)
    store_release(slot + W_RLEN * 8, rlen)
    store_release(slot + W_RESP_TOKEN * 8, token)
    store_release(slot + W_RESP_SEQ * 8, seq)
