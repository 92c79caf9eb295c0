"""The metadata server: the only writer of pool metadata.

It owns the index (block key -> slot), allocation, leases, eviction and the durable slot headers.
Clients write block data themselves and only ask the server to publish it (commit), so metadata has
one writer even on memory that is not coherent between hosts. A restarted server rebuilds the index
from the slot headers; slots that were being written when a client or the server died are reclaimed.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import socketserver
import threading
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from beluga.cxlpool import eviction, fastpath, native
from beluga.cxlpool.coherence import Coherence
from beluga.cxlpool.layout import (
    COMMITTED,
    FREE,
    HEADER_BYTES,
    KEY_BYTES,
    RPC_HEAD,
    RPC_PAYLOAD,
    SERVER_STATUS,
    SLOT_HEADER,
    WRITING,
    Geometry,
)
from beluga.cxlpool.rpc import (
    W_OWNER,
    W_REQ_SEQ,
    W_RESP_SEQ,
    Op,
    Reply,
    _alive,
    read_tcp_request,
    write_tcp_reply,
)
from beluga.cxlpool.table import BlockTable

log = logging.getLogger(__name__)

OK, ERR = 0, -1
ALLOC_NO_ROOM, ALLOC_EXISTS = -1, -2


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
    clients_reaped: int = 0
    rpc_calls: Counter = field(default_factory=Counter)


class PoolIndex:
    """Slot table, index, leases and eviction. Not thread-safe: the server serialises calls."""

    def __init__(self, mem: np.ndarray, geo: Geometry, coh: Coherence, policy: str = "lru",
                 high_watermark: float = 0.95, low_watermark: float = 0.85):
        self.geo, self.coh = geo, coh
        self.headers = np.ndarray(geo.n_slots, SLOT_HEADER, buffer=mem, offset=geo.hdr_off,
                                  strides=(HEADER_BYTES,))
        n = geo.n_slots
        self.state = np.zeros(n, np.uint8)
        self.gen = np.zeros(n, np.uint32)
        self.refs = np.zeros(n, np.int32)
        self.index = BlockTable(n)
        # What the compiled RPC loop did since the last `drain` (see fastpath).
        self.journal, self.counters = fastpath.new_state()
        self.leases: dict[object, Counter] = defaultdict(Counter)
        self.writing: dict[object, set[int]] = defaultdict(set)
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
        self.free = [s for s in free if s in wset] + [s for s in free if s not in wset]
        self.free.reverse()  # pop() takes from the end
        if committed.size:
            log.info("recovered %d committed blocks from slot headers (%d free)", len(self.index),
                     len(self.free))

    # -- operations -----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Bring the Python side up to date with what the compiled RPC loop answered."""
        c = self.counters
        st = self.stats
        st.rpc_calls[Op.HELLO] += int(c[fastpath.C_HELLO])
        st.rpc_calls[Op.LOOKUP] += int(c[fastpath.C_LOOKUPS])
        st.lookups += int(c[fastpath.C_LOOKUPS])
        st.lookup_blocks += int(c[fastpath.C_LOOKUP_BLOCKS])
        st.hit_blocks += int(c[fastpath.C_HIT_BLOCKS])
        rows = self.journal[: c[fastpath.C_JOURNAL]].tolist()
        c[[fastpath.C_JOURNAL, fastpath.C_HELLO, fastpath.C_LOOKUPS, fastpath.C_LOOKUP_BLOCKS,
           fastpath.C_HIT_BLOCKS]] = 0
        for client, pid, s, leased in rows:
            self.policy.touched(s)
            if leased:
                self.leases[("shm", client, pid)][s] += 1

    def lookup(self, client, keys: list[bytes], lease: bool) -> tuple[list[int], list[int]]:
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(keys)
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
        self.stats.hit_blocks += len(slots)
        gen = self.gen
        return slots, [int(gen[s]) for s in slots]

    def release(self, client, slots: list[int]) -> None:
        held = self.leases.get(client)
        for s in slots:
            if held and held[s] > 0:
                held[s] -= 1
                self.refs[s] -= 1
                if held[s] == 0:
                    del held[s]

    def alloc(self, client, keys: list[bytes]) -> tuple[list[int], list[int]]:
        slots, gens = [], []
        self._maybe_evict(len(keys))
        tried = False
        for n, k in enumerate(keys):
            if k in self.index:
                slots.append(ALLOC_EXISTS)
                gens.append(0)
                continue
            if not self.free and not tried:
                self._evict(len(keys) - n)  # one pass over the candidates for all that is left
                tried = True
            if not self.free:
                slots.append(ALLOC_NO_ROOM)
                gens.append(0)
                continue
            s = self.free.pop()
            self.gen[s] += 1
            self.state[s] = WRITING
            self.index.set_key(s, k)
            self.writing[client].add(s)
            self._write_header(s, WRITING, 0, 0, k)
            slots.append(s)
            gens.append(int(self.gen[s]))
        self.stats.allocs += sum(1 for s in slots if s >= 0)
        return slots, gens

    def commit(self, client, entries: list[tuple[int, int, int]], length: int) -> list[int]:
        ok = []
        for s, g, csum in entries:
            if not (0 <= s < self.geo.n_slots) or s not in self.writing.get(client, ()) or self.gen[s] != g:
                ok.append(0)
                continue
            self.writing[client].discard(s)
            key = self.index.key_of(s)
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

    def abort(self, client, entries: list[tuple[int, int]]) -> None:
        for s, g in entries:
            if s in self.writing.get(client, ()) and self.gen[s] == g:
                self.writing[client].discard(s)
                self._free_slot(s)
                self.stats.aborts += 1

    def bad(self, entries: list[tuple[int, int]]) -> None:
        """A reader saw a checksum mismatch: drop the block so nobody is offered it again."""
        for s, g in entries:
            if 0 <= s < self.geo.n_slots and self.state[s] == COMMITTED and self.gen[s] == g:
                self.stats.integrity_failures += 1
                self._drop(s)

    def reap(self, client) -> None:
        """A client went away: give back its leases and the slots it was writing."""
        for s, n in self.leases.pop(client, Counter()).items():
            self.refs[s] -= n
        for s in self.writing.pop(client, set()):
            self._free_slot(s)
            self.stats.reclaimed_slots += 1
        self.stats.clients_reaped += 1

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
            "clients_reaped": st.clients_reaped,
            "rpc_calls": {k.name.lower(): v for k, v in st.rpc_calls.items()},
        }


_OPS = frozenset(int(o) for o in Op)


def _keys(payload: bytes, n: int) -> list[bytes]:
    return [payload[i * KEY_BYTES:(i + 1) * KEY_BYTES] for i in range(n)]


class Dispatcher:
    """Decodes one request, applies it to the index, encodes the reply. Shared by both transports."""

    def __init__(self, index: PoolIndex, block_bytes: int):
        self.index = index
        self.block_bytes = block_bytes
        self.lock = threading.Lock()

    def __call__(self, client, op: int, n: int, args, payload: bytes) -> Reply:
        with self.lock:
            self.index.drain()
            try:
                if op not in _OPS:
                    return Reply(ERR, 0, (0, 0, 0, 0), f"unknown op {op}".encode())
                return self._dispatch(client, Op(op), n, args, payload)
            except Exception as e:  # a malformed request must never take the server down
                log.exception("request %s from %s failed", op, client)
                return Reply(ERR, 0, (0, 0, 0, 0), str(e).encode()[:RPC_PAYLOAD])

    def reap(self, client) -> None:
        """A client is gone: give back what it held (after catching up with the compiled loop)."""
        with self.lock:
            self.index.drain()
            self.index.reap(client)

    def _dispatch(self, client, op, n, args, payload) -> Reply:
        ix = self.index
        ix.stats.rpc_calls[op] += 1
        if op == Op.HELLO:
            return Reply(OK, 0, (ix.geo.n_slots, os.getpid(), 0, 0), b"")
        if op == Op.LOOKUP:
            slots, gens = ix.lookup(client, _keys(payload, n), lease=bool(args[0]))
            return Reply(OK, len(slots), (0, 0, 0, 0), array("I", slots).tobytes() + array("I", gens).tobytes())
        if op == Op.ALLOC:
            slots, gens = ix.alloc(client, _keys(payload, n))
            body = np.asarray(slots, np.int64).tobytes() + np.asarray(gens, np.uint32).tobytes()
            return Reply(OK, n, (0, 0, 0, 0), body)
        if op == Op.COMMIT:
            rec = np.frombuffer(payload, np.dtype([("slot", "<u4"), ("gen", "<u4"), ("csum", "<u8")]), n)
            ok = ix.commit(client, [(int(r["slot"]), int(r["gen"]), int(r["csum"])) for r in rec],
                           int(args[0]) or self.block_bytes)
            return Reply(OK, n, (sum(ok), 0, 0, 0), bytes(ok))
        if op in (Op.ABORT, Op.BAD):
            rec = np.frombuffer(payload, np.uint32, 2 * n).reshape(n, 2).tolist()
            (ix.abort if op == Op.ABORT else lambda c, e: ix.bad(e))(client, [tuple(r) for r in rec])
            return Reply(OK, n, (0, 0, 0, 0), b"")
        if op == Op.RELEASE:
            ix.release(client, np.frombuffer(payload, np.uint32, n).tolist())
            return Reply(OK, n, (0, 0, 0, 0), b"")
        if op == Op.STATS:
            return Reply(OK, 0, (0, 0, 0, 0), json.dumps(ix.snapshot()).encode())
        return Reply(ERR, 0, (0, 0, 0, 0), f"unknown op {op}".encode())


class ShmEndpoint:
    """Server end of the shared-memory RPC: polls every client slot, parks on the doorbell when idle."""

    def __init__(self, mem: np.ndarray, geo: Geometry, dispatch: Dispatcher, bell: str, spin_us: int):
        self.mem, self.geo, self.dispatch = mem, geo, dispatch
        self.base = native.address(mem)
        self.words = np.ndarray((geo.n_clients, geo.rpc_bytes // 8), np.uint64, buffer=mem,
                                offset=geo.rpc_off)
        self.status = np.ndarray(1, SERVER_STATUS, buffer=mem, offset=4096)
        self.seen = self.words[:, W_RESP_SEQ].copy()
        self.req = np.zeros(8, np.uint64)
        self.owners = self.words[:, W_OWNER].copy()
        self.spin_us = spin_us
        self.bell_path = bell
        if os.path.exists(bell):
            os.unlink(bell)
        self.bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.bell.bind(bell)
        self.bell.setblocking(False)
        self.stop = threading.Event()

    def serve_forever(self) -> None:
        ix, geo = self.dispatch.index, self.geo
        rpc_addr = self.base + geo.rpc_off
        area = self.mem[geo.rpc_off: geo.rpc_off + geo.n_clients * geo.rpc_bytes]
        area64, area32 = area.view(np.uint64), area.view(np.uint32)
        pid = os.getpid()
        last_work = time.monotonic()
        last_reap = 0.0
        handled = 0
        while not self.stop.is_set():
            with self.dispatch.lock:
                c = fastpath.serve(rpc_addr, area64, area32, geo.rpc_bytes, geo.n_clients, self.seen, self.owners,
                                   200, ix.index.tab, ix.index.keys, ix.gen, ix.refs, geo.n_slots, pid, ix.journal,
                                   ix.counters)
                if ix.counters[fastpath.C_JOURNAL] and c < 0:
                    ix.drain()  # idle now: catch the Python side up off the critical path
            now = time.monotonic()
            if c >= 0:
                self._handle(c)
            if c >= 0 or ix.counters[fastpath.C_HANDLED] != handled:
                handled = int(ix.counters[fastpath.C_HANDLED])
                last_work = now
            elif now - last_work > self.spin_us * 1e-6:
                self._park()
                last_work = time.monotonic()
            if now - last_reap > 0.5:
                self._reap_dead()
                self.status["heartbeat_ns"] = time.time_ns()
                last_reap = now

    def _park(self) -> None:
        self.status["sleeping"] = 1
        native.full_fence()
        # A request may have landed between the last poll and the flag: look once more.
        base = self.base + self.geo.rpc_off + W_REQ_SEQ * 8
        if native.poll_requests(base, self.geo.rpc_bytes, self.geo.n_clients, self.seen, 1) < 0:
            try:
                select.select([self.bell], [], [], 0.05)
                while True:
                    self.bell.recv(64)
            except BlockingIOError:
                pass
            except (OSError, ValueError):  # closed under us: we are stopping
                if not self.stop.is_set():
                    raise
        self.status["sleeping"] = 0

    def _handle(self, c: int) -> None:
        off = self.geo.rpc_off + c * self.geo.rpc_bytes
        slot = self.base + off
        native.server_read(slot, self.req)
        seq, owner, opn, a0, a1, a2, a3, plen = self.req.tolist()
        if owner != self.owners[c]:
            if self.owners[c]:
                self.dispatch.reap(("shm", c, int(self.owners[c])))
            self.owners[c] = owner
        plen = min(plen, RPC_PAYLOAD)
        payload = self.mem[off + RPC_HEAD: off + RPC_HEAD + plen].tobytes() if plen else b""
        reply = self.dispatch(("shm", c, owner), opn & 0xFFFFFFFF, opn >> 32, (a0, a1, a2, a3), payload)
        body = reply.payload[:RPC_PAYLOAD]
        if body:
            roff = off + RPC_HEAD + RPC_PAYLOAD
            self.mem[roff: roff + len(body)] = np.frombuffer(body, np.uint8)
        r0, r1, r2, r3 = reply.ret
        native.server_reply(slot, (reply.status & 0xFFFFFFFF) | (reply.n << 32), r0, r1, r2, r3, len(body), seq)
        self.seen[c] = seq

    def _reap_dead(self) -> None:
        for c in np.nonzero(self.owners)[0].tolist():
            pid = int(self.owners[c])
            if not _alive(pid):
                self.dispatch.reap(("shm", c, pid))
                self.owners[c] = 0

    def close(self) -> None:
        self.stop.set()
        self.bell.close()
        if os.path.exists(self.bell_path):
            os.unlink(self.bell_path)


class TcpEndpoint(socketserver.ThreadingTCPServer):
    """Server end of the TCP transport; each connection is one client."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, dispatch: Dispatcher):
        self.dispatch = dispatch
        super().__init__((host, port), _TcpHandler)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = ("tcp", self.client_address)
        try:
            while (req := read_tcp_request(sock)) is not None:
                write_tcp_reply(sock, self.server.dispatch(client, *req))
        except (OSError, ValueError) as e:
            log.info("TCP client %s dropped: %s", self.client_address, e)
        finally:
            self.server.dispatch.reap(client)
