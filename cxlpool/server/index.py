"""The metadata server's state: the index (block key -> slot), allocation, leases, eviction and the
durable slot headers. The server is the only writer of pool metadata.

Clients write block data themselves and only ask the server to publish it (commit), so metadata has
one writer even on memory that is not coherent between hosts. A restarted server rebuilds the index
from the slot headers; slots that were being written when a client or the server died are reclaimed.
Leases and slots being written belong to a client session (its token); each session may hold at most
`quota` of each, and a slot allocated but not committed within the write timeout is reclaimed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from beluga.cxlpool.coherence import Coherence
from beluga.cxlpool.layout import COMMITTED, FREE, HEADER_BYTES, SLOT_HEADER, WRITING, Geometry
from beluga.cxlpool.protocol import ALLOC_EXISTS, ALLOC_NO_ROOM, KEY_BYTES, Op
from beluga.cxlpool.server import eviction, fastpath
from beluga.cxlpool.server.table import BlockTable

log = logging.getLogger(__name__)


@dataclass
class Stats:
    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    allocs: int = 0
    commits: int = 0
    duplicate_commits: int = 0
    aborts: int = 0
    evictions: int = 0
    integrity_failures: int = 0
    reclaimed_slots: int = 0
    expired_writes: int = 0
    key_mismatches: int = 0
    false_reports: int = 0
    quota_refusals: int = 0
    clients_reaped: int = 0
    rpc_calls: Counter = field(default_factory=Counter)


class PoolIndex:
    """Slot table, index, leases and eviction. Not thread-safe: the server serialises calls."""

    def __init__(self, mem: np.ndarray, geo: Geometry, coh: Coherence, policy: str = "lru",
                 high_watermark: float = 0.95, low_watermark: float = 0.85, quota: float = 1.0):
        self.geo, self.coh = geo, coh
        self.quota = max(1, int(geo.n_slots * quota))
        self.headers = np.ndarray(geo.n_slots, SLOT_HEADER, buffer=mem, offset=geo.hdr_off,
                                  strides=(HEADER_BYTES,))
        n = geo.n_slots
        self.state = np.zeros(n, np.uint8)
        self.gen = np.zeros(n, np.uint32)
        self.refs = np.zeros(n, np.int32)
        self.index = BlockTable(n)
        # What the compiled RPC loop did since the last `drain` (see fastpath).
        self.journal, self.counters = fastpath.new_state()
        # Per session token: leased slots (with counts) and slots allocated for writing (with the time).
        self.leases: dict[int, Counter] = defaultdict(Counter)
        self.lease_count: Counter = Counter()
        self.writing: dict[int, dict[int, float]] = defaultdict(dict)
        # Shared-memory sessions by RPC slot (the compiled loop reads these): the session's token (0: none)
        # and the leases it holds (the loop checks the quota there).
        self.shm_tokens = np.zeros(geo.n_clients, np.uint64)
        self.shm_leases = np.zeros(geo.n_clients, np.int64)
        self.shm_slot: dict[int, int] = {}  # token -> RPC slot
        self.policy = eviction.make(policy, n)
        self.high = int(n * high_watermark)
        self.low = min(int(n * low_watermark), self.high)
        self.free: list[int] = []
        self.stats = Stats()
        self._rebuild()

    # -- recovery -------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Index every committed slot from the durable headers; everything else is free."""
        h = self.headers
        committed = np.nonzero(h["state"] == COMMITTED)[0]
        self.gen[:] = h["gen"]
        for s in committed.tolist():
            key = bytes(h["key"][s]).ljust(KEY_BYTES, b"\0")
            if key in self.index:  # cannot happen unless a header was corrupted: keep the first
                continue
            self.index.set_key(s, key)
            self.index.add(s)
            self.state[s] = COMMITTED
            self.policy.inserted(s, key)
        writing = np.nonzero(h["state"] == WRITING)[0]
        if writing.size:
            self.stats.reclaimed_slots += int(writing.size)
        free = np.nonzero(self.state == FREE)[0].tolist()
        # Slots that were mid-write go last, so a writer that outlived the old server does not land
        # its bytes in a slot that was just handed to someone else.
        wset = set(writing.tolist())
        self.free = [s for s in free if s in wset] + [s for s in free if s not in wset][::-1]  # pop() takes the last
        if committed.size:
            log.info("recovered %d committed blocks from slot headers (%d free)", len(self.index),
                     len(self.free))

    # -- operations -----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Bring the Python side up to date with what the compiled RPC loop answered."""
        c = self.counters
        st = self.stats
        st.rpc_calls[Op.PING] += int(c[fastpath.C_PING])
        st.rpc_calls[Op.LOOKUP] += int(c[fastpath.C_LOOKUPS])
        st.lookups += int(c[fastpath.C_LOOKUPS])
        st.lookup_blocks += int(c[fastpath.C_LOOKUP_BLOCKS])
        st.hit_blocks += int(c[fastpath.C_HIT_BLOCKS])
        rows = self.journal[: c[fastpath.C_JOURNAL]].tolist()
        c[[fastpath.C_JOURNAL, fastpath.C_PING, fastpath.C_LOOKUPS, fastpath.C_LOOKUP_BLOCKS,
           fastpath.C_HIT_BLOCKS]] = 0
        for _client, token, s, leased in rows:
            self.policy.touched(s)
            if leased:
                self.leases[token][s] += 1
                self.lease_count[token] += 1

    def _leased(self, token: int, n: int) -> None:
        self.lease_count[token] += n
        c = self.shm_slot.get(token)
        if c is not None:
            self.shm_leases[c] += n

    def lookup(self, client: int, keys: list[bytes], lease: bool) -> tuple[list[int], list[int]]:
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(keys)
        if lease and self.lease_count[client] + len(keys) > self.quota:
            self.stats.quota_refusals += 1
            keys = keys[: max(0, self.quota - self.lease_count[client])]
        slots = []
        for k in keys:
            s = self.index.get(k)
            if s is None:
                break
            slots.append(s)
        for s in slots:
            self.policy.touched(s)
            if lease:
                self.refs[s] += 1
                self.leases[client][s] += 1
        if lease:
            self._leased(client, len(slots))
        self.stats.hit_blocks += len(slots)
        gen = self.gen
        return slots, [int(gen[s]) for s in slots]

    def release(self, client: int, slots: list[int]) -> None:
        held = self.leases.get(client)
        done = 0
        for s in slots:
            if held and held[s] > 0:
                held[s] -= 1
                self.refs[s] -= 1
                done += 1
                if held[s] == 0:
                    del held[s]
        self._leased(client, -done)

    def alloc(self, client: int, keys: list[bytes]) -> tuple[list[int], list[int]]:
        slots, gens = [], []
        room = self.quota - len(self.writing[client])
        if room < len(keys):
            self.stats.quota_refusals += 1
        self._maybe_evict(min(len(keys), max(room, 0)))
        tried = False
        now = time.monotonic()
        for n, k in enumerate(keys):
            if k in self.index:
                slots.append(ALLOC_EXISTS)
                gens.append(0)
                continue
            if not self.free and not tried:
                self._evict(len(keys) - n)  # one pass over the candidates for all that is left
                tried = True
            if not self.free or room <= 0:
                slots.append(ALLOC_NO_ROOM)
                gens.append(0)
                continue
            s = self.free.pop()
            self.gen[s] += 1
            self.state[s] = WRITING
            self.index.set_key(s, k)
            self.writing[client][s] = now
            room -= 1
            self._write_header(s, WRITING, 0, 0, k)
            slots.append(s)
            gens.append(int(self.gen[s]))
        self.stats.allocs += sum(1 for s in slots if s >= 0)
        return slots, gens

    def commit(self, client: int, entries: list[tuple[int, int, int, bytes]], length: int) -> list[int]:
        ok = []
        for s, g, csum, claimed in entries:
            if s not in self.writing.get(client, ()) or self.gen[s] != g:
                ok.append(0)
                continue
            del self.writing[client][s]
            key = self.index.key_of(s)
            if key != claimed:  # the writer wrote another block than the slot was allocated for
                self.stats.key_mismatches += 1
                self._free_slot(s)
                ok.append(0)
                continue
            if key in self.index:  # another client committed the same block first
                self.stats.duplicate_commits += 1
                self._free_slot(s)
                ok.append(1)
                continue
            self._write_header(s, COMMITTED, length, csum, key)
            self.state[s] = COMMITTED
            self.index.add(s)
            self.policy.inserted(s, key)
            self.stats.commits += 1
            ok.append(1)
        return ok

    def abort(self, client: int, entries: list[tuple[int, int]]) -> None:
        for s, g in entries:
            if s in self.writing.get(client, ()) and self.gen[s] == g:
                del self.writing[client][s]
                self._free_slot(s)
                self.stats.aborts += 1

    def bad(self, entries: list[tuple[int, int]], block_bytes: int) -> int:
        """A reader saw a checksum mismatch: drop the block so nobody is offered it again, once the server
        has seen the mismatch itself (a hostile session must not be able to empty the cache). Another
        reader still copying it sees its checksum fail too: a miss."""
        dropped = 0
        scratch = np.empty(block_bytes, np.uint8)
        for s, g in entries:
            if self.state[s] != COMMITTED or self.gen[s] != g:
                continue
            off = self.geo.data_off + s * self.geo.slot_bytes
            if self.coh.read_block(off, scratch.ctypes.data, block_bytes) == int(self.headers["checksum"][s]):
                self.stats.false_reports += 1
                continue
            self.stats.integrity_failures += 1
            self._drop(s)
            dropped += 1
        return dropped

    def reap(self, client: int) -> None:
        """A client session ended: give back its leases and the slots it was writing."""
        for s, n in self.leases.pop(client, Counter()).items():
            self.refs[s] -= n
        self.lease_count.pop(client, None)
        c = self.shm_slot.pop(client, None)
        if c is not None:
            self.shm_leases[c] = 0
            self.shm_tokens[c] = 0
        for s in self.writing.pop(client, {}):
            self._free_slot(s)
            self.stats.reclaimed_slots += 1
        self.stats.clients_reaped += 1

    def expire_writes(self, older_than: float) -> int:
        """Reclaim slots allocated before `older_than` (monotonic) and never committed: a live client
        that hangs must not hold pool space forever. Its late commit is refused (the slot left its set)."""
        done = 0
        for writing in self.writing.values():
            for s in [s for s, t in writing.items() if t < older_than]:
                del writing[s]
                self._free_slot(s)
                done += 1
        self.stats.expired_writes += done
        return done

    # -- internals ------------------------------------------------------------------------------------
    def used(self) -> int:
        return self.geo.n_slots - len(self.free)

    def _maybe_evict(self, incoming: int) -> None:
        if self.used() + incoming > self.high:
            self._evict(self.used() + incoming - self.low)

    def _evict(self, count: int) -> None:
        done = 0
        for s in self.policy.victims():
            if done >= count:
                break
            if self.state[s] != COMMITTED or self.refs[s] > 0:
                continue
            self._drop(s)
            self.stats.evictions += 1
            done += 1

    def _drop(self, s: int) -> None:
        if self.state[s] == COMMITTED:
            self.index.discard(s)
        self.policy.removed(s)
        self._free_slot(s)

    def _free_slot(self, s: int) -> None:
        self.state[s] = FREE
        self._write_header(s, FREE, 0, 0, b"")
        self.free.append(s)

    def _write_header(self, s: int, state: int, length: int, csum: int, key: bytes) -> None:
        rec = np.zeros(1, SLOT_HEADER)
        rec["gen"] = self.gen[s]
        rec["length"] = length
        rec["checksum"] = csum
        rec["key"] = key
        rec["commit_ns"] = time.time_ns() if state == COMMITTED else 0
        raw = rec.tobytes()
        off = self.geo.hdr_off + s * HEADER_BYTES
        # Body first, state word last: a reader never sees COMMITTED beside a half-written header.
        self.coh.write_record(off + 4, raw[4:])
        self.coh.write_record(off, np.uint32(state).tobytes())

    def snapshot(self) -> dict:
        st = self.stats
        return {
            "slots": self.geo.n_slots,
            "slot_bytes": self.geo.slot_bytes,
            "used_slots": self.used(),
            "committed_blocks": len(self.index),
            "leased_slots": int(np.count_nonzero(self.refs > 0)),
            "writing_slots": int(np.count_nonzero(self.state == WRITING)),
            "eviction_policy": self.policy.name,
            "lookups": st.lookups,
            "lookup_blocks": st.lookup_blocks,
            "hit_blocks": st.hit_blocks,
            "allocs": st.allocs,
            "commits": st.commits,
            "duplicate_commits": st.duplicate_commits,
            "aborts": st.aborts,
            "evictions": st.evictions,
            "integrity_failures": st.integrity_failures,
            "reclaimed_slots": st.reclaimed_slots,
            "expired_writes": st.expired_writes,
            "key_mismatches": st.key_mismatches,
            "false_reports": st.false_reports,
            "quota_refusals": st.quota_refusals,
            "clients_reaped": st.clients_reaped,
            "rpc_calls": {k.name.lower(): v for k, v in st.rpc_calls.items()},
        }


