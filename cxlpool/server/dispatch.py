"""Decoding a request, checking it, applying it to the index, encoding the reply: one place for both
transports, and the session table that gives every client its identity.

Every request is checked whole before it has any effect: its op, its count, its exact payload length, the
session its token names, and every slot number it carries. A malformed request changes nothing and gets
`Status.ERROR` with the reason. Counts are capped per call (`protocol.MAX_N`), so no request holds the
server lock for long.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from array import array
from contextlib import contextmanager

import numpy as np

from beluga.cxlpool.protocol import COMMIT_REC, KEY_BYTES, PAIR_REC, Op, Reply, Status, check_request
from beluga.cxlpool.server.index import PoolIndex

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, index: PoolIndex, block_bytes: int, server_id: int):
        self.index = index
        self.block_bytes = block_bytes
        self.server_id = server_id
        self.lock = threading.Lock()
        self.waiting = 0  # threads waiting for the lock: the shared-memory loop lets them in first
        self.sessions: dict[int, str] = {}  # token -> where it calls from ("shm:3", "tcp:10.0.0.2:5123")

    @contextmanager
    def locked(self):
        """The lock, for a thread other than the shared-memory loop (which retakes it in a tight loop and
        would otherwise starve TCP clients)."""
        self.waiting += 1  # a hint, read without the lock
        with self.lock:
            self.waiting -= 1
            yield

    # -- sessions -------------------------------------------------------------------------------------------
    def open_session(self, where: str, rpc_slot: int | None = None) -> int:
        """A new session and its random token (63 bits: it also travels as a signed journal word).
        `rpc_slot`: the shared-memory slot it calls through, which the compiled loop then serves."""
        with self.locked():
            token = secrets.randbits(63) | 1
            self.sessions[token] = where
            if rpc_slot is not None:
                self.index.shm_slot[token] = rpc_slot
                self.index.shm_leases[rpc_slot] = 0
                self.index.shm_tokens[rpc_slot] = token
            log.debug("session %x opened (%s)", token, where)
            return token

    def close_session(self, token: int, why: str) -> None:
        """The session is over (reaped, disconnected, replaced): give back what it held."""
        with self.locked():
            self.index.drain()
            where = self.sessions.pop(token, None)
            if where is not None:
                self.index.reap(token)
                log.info("session %x (%s) closed: %s", token, where, why)

    def hello_reply(self, token: int) -> Reply:
        return Reply(int(Status.OK), 0, (self.index.geo.n_slots, self.server_id, token, 0))

    # -- requests -------------------------------------------------------------------------------------------
    def __call__(self, token: int, op: int, n: int, args, payload: bytes) -> Reply:
        why = check_request(op, n, len(payload))
        if why is not None:
            return Reply.error(why)
        with self.locked():
            self.index.drain()
            if token not in self.sessions:
                return Reply.error("no such session (reaped, or the server restarted): say HELLO again",
                                   Status.EXPIRED)
            try:
                return self._dispatch(token, Op(op), n, args, payload)
            except Exception as e:  # a bug must never take the server down; the request is refused
                log.exception("request %s from session %x failed", op, token)
                return Reply.error(f"server error: {e}")

    def _slots_ok(self, slots: np.ndarray) -> str | None:
        if slots.size and int(slots.max()) >= self.index.geo.n_slots:
            return f"slot {int(slots.max())} outside the pool's {self.index.geo.n_slots}"
        return None

    def _dispatch(self, token: int, op: Op, n: int, args, payload: bytes) -> Reply:
        ix = self.index
        ix.stats.rpc_calls[op] += 1
        if op == Op.PING:
            return Reply(int(Status.OK))
        if op == Op.HELLO:
            return Reply.error("HELLO opens a session; this one is open already")
        if op in (Op.LOOKUP, Op.ALLOC):
            keys = [payload[i * KEY_BYTES:(i + 1) * KEY_BYTES] for i in range(n)]
            if op == Op.LOOKUP:
                slots, gens = ix.lookup(token, keys, lease=bool(args[0]))
                return Reply(int(Status.OK), len(slots), payload=array("I", slots).tobytes()
                             + array("I", gens).tobytes())
            slots, gens = ix.alloc(token, keys)
            return Reply(int(Status.OK), n, payload=np.asarray(slots, np.int64).tobytes()
                         + np.asarray(gens, np.uint32).tobytes())
        if op == Op.COMMIT:
            rec = np.frombuffer(payload, COMMIT_REC, n)
            if (why := self._slots_ok(rec["slot"])) or args[0] != self.block_bytes:
                return Reply.error(why or f"COMMIT: block length {args[0]}, the pool's blocks are "
                                          f"{self.block_bytes} bytes")
            ok = ix.commit(token, list(zip(rec["slot"].tolist(), rec["gen"].tolist(), rec["csum"].tolist(),
                                           [bytes(k) for k in rec["key"]], strict=True)), self.block_bytes)
            return Reply(int(Status.OK), n, (sum(ok), 0, 0, 0), bytes(ok))
        if op in (Op.ABORT, Op.BAD):
            rec = np.frombuffer(payload, PAIR_REC, n)
            if why := self._slots_ok(rec["slot"]):
                return Reply.error(why)
            pairs = list(zip(rec["slot"].tolist(), rec["gen"].tolist(), strict=True))
            if op == Op.ABORT:
                ix.abort(token, pairs)
                return Reply(int(Status.OK), n)
            return Reply(int(Status.OK), n, (ix.bad(pairs, self.block_bytes), 0, 0, 0))
        if op == Op.RELEASE:
            slots = np.frombuffer(payload, np.uint32, n)
            if why := self._slots_ok(slots):
                return Reply.error(why)
            ix.release(token, slots.tolist())
            return Reply(int(Status.OK), n)
        assert op == Op.STATS  # check_request let through known ops only
        return Reply(int(Status.OK), payload=json.dumps(self.snapshot()).encode())

    def snapshot(self) -> dict:
        """Stats; call with the lock held."""
        return self.index.snapshot() | {"sessions": len(self.sessions)}
