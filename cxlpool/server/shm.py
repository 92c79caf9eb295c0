"""Server end of the shared-memory RPC: polls every client's RPC slot, parks on a doorbell when idle, and
watches each slot's claim and heartbeat words to reap clients that stopped (never by process id).

A slot is live while its claim word is set and any of (claim, heartbeat, request sequence) keeps moving;
one that stands still longer than the heartbeat timeout is reaped: the session's leases and half-written
slots go back, and the claim is cleared so another client may take the slot.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time

import numpy as np

from beluga.cxlpool import native
from beluga.cxlpool.layout import Geometry, server_status
from beluga.cxlpool.protocol import (
    MAX_PAYLOAD,
    SLOT_HEAD_BYTES,
    W_BEAT,
    W_CLAIM,
    W_REQ_SEQ,
    W_RESP_SEQ,
    Op,
    Reply,
    Status,
)
from beluga.cxlpool.server import fastpath
from beluga.cxlpool.server.dispatch import Dispatcher

log = logging.getLogger(__name__)

LIVENESS_EVERY_S = 0.25
BEAT_EVERY_S = 0.1


class ShmEndpoint:
    def __init__(self, mem: np.ndarray, geo: Geometry, dispatch: Dispatcher, bell: str, spin_us: int,
                 heartbeat_timeout_s: float):
        self.mem, self.geo, self.dispatch = mem, geo, dispatch
        self.base = native.address(mem)
        self.words = np.ndarray((geo.n_clients, geo.rpc_bytes // 8), np.uint64, buffer=mem, offset=geo.rpc_off)
        self.status = server_status(mem)
        self.seen = self.words[:, W_RESP_SEQ].copy()  # a request left unanswered by a dead server gets answered
        self.req = np.zeros(8, np.uint64)
        self.spin_us, self.timeout_s = spin_us, heartbeat_timeout_s
        # Liveness: the last (claim, beat, request sequence) seen per slot, and when it last moved.
        self.last_words = np.zeros((geo.n_clients, 3), np.uint64)
        self.last_moved = np.full(geo.n_clients, time.monotonic())
        self.session_claim: dict[int, int] = {}  # rpc slot -> the claim its session was opened under
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
        last_work = time.monotonic()
        last_check = last_beat = 0.0
        handled = 0
        while not self.stop.is_set():
            with self.dispatch.lock:
                c = fastpath.serve(rpc_addr, area64, area32, geo.rpc_bytes, geo.n_clients, self.seen,
                                   ix.shm_tokens, ix.shm_leases, ix.quota, 200, ix.index.tab, ix.index.keys,
                                   ix.gen, ix.refs, ix.journal, ix.counters)
                if ix.counters[fastpath.C_JOURNAL] and c < 0:
                    ix.drain()  # idle now: catch the Python side up off the critical path
            now = time.monotonic()
            if self.dispatch.waiting:
                os.sched_yield()  # let a TCP thread take the lock before the loop takes it again
            if c >= 0:
                self._handle(c)
            if c >= 0 or ix.counters[fastpath.C_HANDLED] != handled:
                handled = int(ix.counters[fastpath.C_HANDLED])
                last_work = now
            elif now - last_work > self.spin_us * 1e-6:
                self._park()
                last_work = time.monotonic()
            if now - last_beat > BEAT_EVERY_S:
                self.status["beat"] += 1
                self.status["heartbeat_ns"] = time.time_ns()
                last_beat = now
            if now - last_check > LIVENESS_EVERY_S:
                self._check_liveness(now)
                last_check = now

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
        """A request the compiled loop handed back: HELLO, a token it does not know, or any other op."""
        off = self.geo.rpc_off + c * self.geo.rpc_bytes
        slot = self.base + off
        native.server_read(slot, self.req)
        seq, token, opn, a0, a1, a2, a3, plen = (int(x) for x in self.req)
        op, n = opn & 0xFFFFFFFF, opn >> 32
        self.last_moved[c] = time.monotonic()
        ix = self.dispatch.index
        if plen > MAX_PAYLOAD:
            reply = Reply.error(f"payload length {plen} over the cap of {MAX_PAYLOAD}")
        elif op == Op.HELLO:
            reply = self._hello(c, token, plen)
        elif token == 0 or token != int(ix.shm_tokens[c]):
            reply = Reply.error("no such session on this RPC slot: say HELLO again", Status.EXPIRED)
        else:
            payload = self.mem[off + SLOT_HEAD_BYTES: off + SLOT_HEAD_BYTES + plen].tobytes()
            reply = self.dispatch(token, op, n, (a0, a1, a2, a3), payload)
        body = reply.payload[:MAX_PAYLOAD]
        if body:
            roff = off + SLOT_HEAD_BYTES + MAX_PAYLOAD
            self.mem[roff: roff + len(body)] = np.frombuffer(body, np.uint8)
        r0, r1, r2, r3 = reply.ret
        native.server_reply(slot, (reply.status & 0xFFFFFFFF) | (reply.n << 32), r0, r1, r2, r3, len(body), token,
                            seq)
        self.seen[c] = seq

    def _hello(self, c: int, claim_said: int, plen: int) -> Reply:
        """A session for the client that holds the slot's claim now, and for no one else: a client that
        lost the slot (reaped while it stood still) and writes into it late cannot open one here."""
        claim = int(self.words[c, W_CLAIM])
        if claim == 0 or claim != claim_said or plen:
            return Reply.error("HELLO must carry the slot's claim as its token, and no payload")
        old = int(self.dispatch.index.shm_tokens[c])
        if old:
            self.dispatch.close_session(old, f"shm:{c} said HELLO again")
        token = self.dispatch.open_session(f"shm:{c}", rpc_slot=c)
        self.session_claim[c] = claim
        return self.dispatch.hello_reply(token)

    def _check_liveness(self, now: float) -> None:
        """Reap slots whose claim, heartbeat and requests all stood still past the timeout, and sessions
        whose slot was claimed by someone else."""
        w = self.words[:, [W_CLAIM, W_BEAT, W_REQ_SEQ]]
        moved = (w != self.last_words).any(axis=1)
        self.last_moved[moved] = now
        self.last_words[:] = w
        ix = self.dispatch.index
        for c in np.nonzero(w[:, 0] | ix.shm_tokens)[0].tolist():
            claim, token = int(w[c, 0]), int(ix.shm_tokens[c])
            if token and claim != self.session_claim.get(c):
                self.dispatch.close_session(token, f"shm:{c} claimed anew")
            elif claim and now - self.last_moved[c] > self.timeout_s:
                if token:
                    self.dispatch.close_session(token, f"shm:{c} heartbeat stopped for {self.timeout_s}s")
                # Free the slot for another client. If its owner is only slow, its next call finds the claim
                # gone and takes another slot; its HELLO carries its own claim, so it cannot take this one.
                native.atomic_cas(self.base + self.geo.rpc_off + c * self.geo.rpc_bytes + W_CLAIM * 8,
                                  np.uint64(claim), np.uint64(0))
                self.session_claim.pop(c, None)

    def close(self) -> None:
        self.stop.set()
        self.bell.close()
        if os.path.exists(self.bell_path):
            os.unlink(self.bell_path)
