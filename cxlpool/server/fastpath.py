"""The metadata server's hot loop, compiled: poll every client's RPC slot and answer PING and LOOKUP
without returning to Python.

A lookup is on the critical path of every request an engine schedules; in Python its decoding, dict
probes and encoding cost tens of microseconds, compiled they cost well under one. Everything else
(HELLO and sessions, allocation, commit, eviction, lease bookkeeping, stats) stays in Python: the loop
hands those requests back (returns the client's number) and the server's `Dispatcher` answers them. So
does anything the loop does not like: a token that is not the slot's session, a malformed count or
payload, a lease quota that would be passed, a full journal.

What the loop changes besides the reply it records in `journal` (one row per block it returned: the
RPC slot, its session token, the block's slot, and whether it was leased) and `counters`; the server
drains both into its Python state before it touches the index again. A lease's reference count is taken
here at once, so eviction can never pick a block a reply just handed out.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from beluga.cxlpool import native
from beluga.cxlpool.protocol import (
    KEY_BYTES,
    MAX_N,
    MAX_PAYLOAD,
    SLOT_HEAD_BYTES,
    W_ARGS,
    W_OPN,
    W_PLEN,
    W_REQ_SEQ,
    W_TOKEN,
    Op,
)
from beluga.cxlpool.server.table import find

PING, LOOKUP = int(Op.PING), int(Op.LOOKUP)
MAX_KEYS = MAX_N[Op.LOOKUP]

# counters
C_JOURNAL, C_HANDLED, C_PING, C_LOOKUPS, C_LOOKUP_BLOCKS, C_HIT_BLOCKS = range(6)
N_COUNTERS = 6
JOURNAL_ROWS = 1 << 16


def new_state() -> tuple[np.ndarray, np.ndarray]:
    """(journal, counters) arrays for one server."""
    return np.zeros((JOURNAL_ROWS, 4), np.int64), np.zeros(N_COUNTERS, np.int64)


@njit(cache=True, nogil=True)
def serve(rpc_addr, area64, area32, rpc_bytes, n_clients, seen, tokens, leases, quota, spins, tab, keys, gen,
          refs, journal, counters):
    """Answer PING and LOOKUP requests until `spins` sweeps find nothing new. Returns -1 then, or the
    number of a client whose request Python must answer."""
    idle = 0
    while idle < spins:
        idle += 1
        for c in range(n_clients):
            slot = rpc_addr + c * rpc_bytes
            seq = native.load_acquire(slot + W_REQ_SEQ * 8)
            if seq == seen[c]:
                continue
            token = native.load_acquire(slot + W_TOKEN * 8)
            if token == 0 or token != tokens[c]:
                return c
            opn = native.load_acquire(slot + W_OPN * 8)
            op = opn & np.uint64(0xFFFFFFFF)
            n = np.int64(opn >> np.uint64(32))
            plen = native.load_acquire(slot + W_PLEN * 8)
            if op == PING:
                if n != 0 or plen != 0:
                    return c
                native.server_reply(slot, np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0),
                                    np.uint64(0), np.uint64(0), token, seq)
                counters[C_PING] += 1
            elif op == LOOKUP:
                lease = native.load_acquire(slot + W_ARGS * 8) != 0
                if n > MAX_KEYS or plen != np.uint64(n * KEY_BYTES) or \
                        counters[C_JOURNAL] + n > journal.shape[0] or (lease and leases[c] + n > quota):
                    return c
                kw = (c * rpc_bytes + SLOT_HEAD_BYTES) // 8
                out = (c * rpc_bytes + SLOT_HEAD_BYTES + MAX_PAYLOAD) // 4
                hits = 0
                for i in range(n):
                    k = kw + 4 * i
                    s = find(tab, keys, area64[k], area64[k + 1], area64[k + 2], area64[k + 3])
                    if s < 0:
                        break
                    area32[out + i] = s
                    hits += 1
                j = counters[C_JOURNAL]
                for i in range(hits):
                    s = area32[out + i]
                    area32[out + hits + i] = gen[s]
                    if lease:
                        refs[s] += 1
                    journal[j + i, 0] = c
                    journal[j + i, 1] = np.int64(token)
                    journal[j + i, 2] = s
                    journal[j + i, 3] = lease
                if lease:
                    leases[c] += hits
                counters[C_JOURNAL] = j + hits
                counters[C_LOOKUPS] += 1
                counters[C_LOOKUP_BLOCKS] += n
                counters[C_HIT_BLOCKS] += hits
                native.server_reply(slot, np.uint64(hits) << np.uint64(32), np.uint64(0), np.uint64(0),
                                    np.uint64(0), np.uint64(0), np.uint64(8 * hits), token, seq)
            else:
                return c
            seen[c] = seq
            counters[C_HANDLED] += 1
            idle = 0
    return -1
