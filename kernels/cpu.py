"""CPU block copies between an engine's paged KV cache and pool slots (numba `njit`).

A pool block is contiguous: for each layer, the block's runs of the engine's cache, in order. Writes to
the pool use non-temporal stores (they go to memory, where other hosts read them, and do not evict the
engine's working set from the cache). Every copy also computes the block's checksum on the fly, so
verifying a block costs no extra pass over memory.

Checksum: the sum over the block's 64-bit words w_i of (w_i ^ i*K1) * K2 (mod 2^64). Order-independent,
so GPU threads can add partial sums, and position-sensitive, so moved data does not pass.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

llvm.initialize_native_asmparser()  # numba's JIT needs it for inline asm (sfence)

K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = np.uint64(0xBF58476D1CE4E5B9)
_i32 = ir.IntType(32)


def _ptr(builder, addr):
    return builder.inttoptr(addr, ir.PointerType(ir.IntType(64)))


@intrinsic
def _nt_store(typingctx, addr, value):
    """Non-temporal 64-bit store (`movnti`): goes to memory, not to this core's cache."""
    sig = types.void(types.int64, types.uint64)

    def codegen(context, builder, sig, args):
        st = builder.store(args[1], _ptr(builder, args[0]))
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_i32, 1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _load_u64(typingctx, addr):
    sig = types.uint64(types.int64)

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0]), align=8)

    return sig, codegen


@intrinsic
def _store_u64(typingctx, addr, value):
    sig = types.void(types.int64, types.uint64)

    def codegen(context, builder, sig, args):
        builder.store(args[1], _ptr(builder, args[0]), align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=True)
def checksum(addr, nbytes):
    """Checksum of nbytes (a multiple of 8) at addr; see K1/K2."""
    acc = np.uint64(0)
    for i in range(nbytes // 8):
        w = _load_u64(addr + i * 8)
        acc += (w ^ (np.uint64(i) * K1)) * K2
    return acc


@njit(cache=True, nogil=True, inline="always")
def _copy(dst, src, nbytes, word0, nontemporal):
    acc = np.uint64(0)
    base = np.uint64(word0)
    for i in range(nbytes // 8):
        w = _load_u64(src + i * 8)
        if nontemporal:  # loop-invariant: LLVM compiles two loops
            _nt_store(dst + i * 8, w)
        else:
            _store_u64(dst + i * 8, w)
        acc += (w ^ ((base + np.uint64(i)) * K1)) * K2
    return acc


@njit(cache=True, nogil=True)
def copy_nt_checksum(dst, src, nbytes, word0):
    """Copy nbytes from src to dst with non-temporal stores; checksum the words (index from word0)."""
    return _copy(dst, src, nbytes, word0, True)


@njit(cache=True, nogil=True)
def copy_checksum(dst, src, nbytes, word0):
    """Copy nbytes from src to dst with plain stores; checksum the words (index from word0)."""
    return _copy(dst, src, nbytes, word0, False)


@njit(cache=True, nogil=True, inline="always")
def _move(bases, block_stride, runs, run_bytes, block_ids, slot_addrs, checksums, to_pool):
    n_layers, n_runs = runs.shape
    for i in range(block_ids.size):
        pos = 0
        acc = np.uint64(0)
        for layer in range(n_layers):
            block = bases[layer] + block_ids[i] * block_stride[layer]
            for r in range(n_runs):
                if to_pool:  # non-temporal into the pool: other hosts read it from memory
                    acc += _copy(slot_addrs[i] + pos, block + runs[layer, r], run_bytes, pos // 8, True)
                else:
                    acc += _copy(block + runs[layer, r], slot_addrs[i] + pos, run_bytes, pos // 8, False)
                pos += run_bytes
        checksums[i] = acc


@njit(cache=True, nogil=True)
def gather(bases, block_stride, runs, run_bytes, block_ids, slot_addrs, checksums):
    """Engine cache -> pool: block block_ids[i] of every layer into the slot at slot_addrs[i]."""
    _move(bases, block_stride, runs, run_bytes, block_ids, slot_addrs, checksums, True)
    _sfence_all()


@njit(cache=True, nogil=True)
def scatter(bases, block_stride, runs, run_bytes, block_ids, slot_addrs, checksums):
    """Pool -> engine cache: the slot at slot_addrs[i] into block block_ids[i] of every layer."""
    _move(bases, block_stride, runs, run_bytes, block_ids, slot_addrs, checksums, False)


@intrinsic
def _sfence(typingctx):
    sig = types.void()

    def codegen(context, builder, sig, args):
        builder.asm(ir.FunctionType(ir.VoidType(), []), "sfence", "~{memory}", [], side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def _sfence_all():
    # Non-temporal stores are weakly ordered: fence before anyone is told the data is there.
    _sfence()
