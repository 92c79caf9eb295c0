"""Client ends of the two RPC transports. The messages are `protocol`'s; both transports hold one session.

Shared memory (the fast path, one host or hardware-coherent memory): the client object claims a free RPC
slot of the pool by compare-and-swap of a random claim word (so every client object, however many per
process, has its own slot), says HELLO, and then calls through it. It publishes a request by a
release-store of a new sequence number; the server answers by a release-store of that number in its own
line, with the request's token beside it. The server polls; when idle it parks on a doorbell (a Unix
datagram socket beside the pool) that a client rings when it sees the server parked.

TCP (clients on other hosts, or that cannot map the RPC area coherently): the same messages as frames. The
server opens with a challenge; HELLO answers it with an HMAC under the pool token.

Both check that a reply answers this very request (sequence and token), so a late or stray reply is never
taken for another; a call that times out ends the session (the server releases what it held), and the
next call opens a new one.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

import numpy as np

from beluga.cxlpool import native
from beluga.cxlpool.errors import PoolRefused, PoolUnavailable
from beluga.cxlpool.layout import Geometry, server_status
from beluga.cxlpool.protocol import (
    CHALLENGE_BYTES,
    MAX_PAYLOAD,
    REQ_FRAME,
    RESP_FRAME,
    SLOT_HEAD_BYTES,
    W_BEAT,
    W_CLAIM,
    W_RESP_SEQ,
    Op,
    Reply,
    Status,
    proof,
    recv_exact,
)

log = logging.getLogger(__name__)


class ShmTransport:
    def __init__(self, mem: np.ndarray, geo: Geometry, bell: str, timeout_s: float = 5.0, spins: int = 20000):
        self.mem, self.geo, self.bell, self.timeout_s, self.spins = mem, geo, bell, timeout_s, spins
        self.base = native.address(mem)
        self.status = server_status(mem)
        self.out = np.zeros(8, np.uint64)
        self.token = 0
        self.slot = -1  # claimed at the first call
        self.claim = secrets.randbits(63) | 1
        self._beat = 0
        self._bell_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._bell_sock.setblocking(False)

    def _word(self, w: int, slot: int | None = None) -> int:
        return self.base + self.geo.rpc_off + (self.slot if slot is None else slot) * self.geo.rpc_bytes + w * 8

    def _take_slot(self) -> None:
        for c in range(self.geo.n_clients):
            if int(native.atomic_cas(self._word(W_CLAIM, c), np.uint64(0), np.uint64(self.claim))) == 0:
                self._use(c)
                return
        raise PoolUnavailable(f"all {self.geo.n_clients} RPC slots of the pool are claimed by live clients; "
                              "create the pool with more --clients")

    def _use(self, c: int) -> None:
        self.slot = c
        off = self.geo.rpc_off + c * self.geo.rpc_bytes
        self.req_payload = self.mem[off + SLOT_HEAD_BYTES: off + SLOT_HEAD_BYTES + MAX_PAYLOAD]
        self.resp_payload = self.mem[off + SLOT_HEAD_BYTES + MAX_PAYLOAD: off + SLOT_HEAD_BYTES + 2 * MAX_PAYLOAD]
        self.slot_addr = self.base + off
        self.resp_addr = self._word(W_RESP_SEQ)
        # Continue after whatever sequence the slot's last user reached, so no old reply matches ours.
        self.seq = max(int(self.mem[off:off + 8].view(np.uint64)[0]),
                       int(native.atomic_load(self.resp_addr))) + 1
        self.token = 0

    def _holds_slot(self) -> bool:
        return self.slot >= 0 and int(native.atomic_load(self._word(W_CLAIM))) == self.claim

    def beat(self) -> None:
        """Heartbeat: one store, and only on a slot still ours. The server reaps a slot whose words all
        stand still."""
        if self._holds_slot():
            self._beat += 1
            native.atomic_store(self._word(W_BEAT), np.uint64(self._beat))

    def call(self, op: Op, n: int, args, payload: bytes | np.ndarray) -> Reply:
        if not self.token and op != Op.HELLO:
            self.hello()
        return self._call(op, n, args, payload)

    def hello(self) -> int:
        r = self._call(Op.HELLO, 0, (0, 0, 0, 0), b"")
        if r.status != Status.OK:
            raise PoolRefused(f"HELLO refused: {r.payload.decode(errors='replace')}")
        self.token = r.ret[2]
        return self.token

    def _call(self, op: Op, n: int, args, payload) -> Reply:
        # Every request, HELLO too, goes out only on a slot still claimed by this client; a client that
        # stood still past the heartbeat timeout lost it and takes another.
        if not self._holds_slot():
            if self.slot >= 0:
                log.warning("RPC slot %d was reclaimed (this client stood still past the heartbeat timeout); "
                            "taking another", self.slot)
            self._take_slot()
            if op != Op.HELLO:
                self.hello()
        nbytes = len(payload) if isinstance(payload, bytes | bytearray) else payload.nbytes
        if nbytes > MAX_PAYLOAD:
            raise ValueError(f"RPC payload of {nbytes} bytes exceeds {MAX_PAYLOAD}; split the call")
        if nbytes:
            data = np.frombuffer(payload, np.uint8) if isinstance(payload, bytes | bytearray) else payload
            self.req_payload[:nbytes] = data.view(np.uint8).ravel()
        self.seq += 1
        a0, a1, a2, a3 = args
        token = self.token if op != Op.HELLO else self.claim
        if not native.client_call(self.slot_addr, int(op) | (n << 32), token, a0, a1, a2, a3, nbytes, self.seq,
                                  self.spins, self.out):
            self._wait_slow(self.seq)
            native.read_reply(self.slot_addr, self.out)
        sn, r0, r1, r2, r3, rlen, rseq, rtoken = self.out.tolist()
        if rseq != self.seq or rtoken != token or rlen > MAX_PAYLOAD:
            self.token = 0
            raise PoolRefused(f"a reply on RPC slot {self.slot} answers another request (seq {rseq}, expected "
                              f"{self.seq}); dropped, the session restarts")
        status = sn & 0xFFFFFFFF
        return Reply(status, sn >> 32, (r0, r1, r2, r3), self.resp_payload[:rlen].tobytes() if rlen else b"")

    def _wait_slow(self, seq: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        pause = 20e-6
        want = np.uint64(seq)
        while True:
            if self.status["sleeping"][0]:
                try:
                    self._bell_sock.sendto(b"!", self.bell)
                except OSError:
                    pass  # no server bound: the timeout below reports it
            if native.wait_for_value(self.resp_addr, want, self.spins):
                return
            if time.monotonic() > deadline:
                # The server may still answer later and, say, take leases: end the session so that the
                # server gives them back when we say HELLO again.
                self.token = 0
                raise PoolUnavailable(
                    f"metadata server did not answer within {self.timeout_s}s; is `beluga pool serve` "
                    "running for this pool?")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    def close(self) -> None:
        if self.slot >= 0:
            native.atomic_cas(self._word(W_CLAIM), np.uint64(self.claim), np.uint64(0))
        self._bell_sock.close()


class TcpTransport:
    def __init__(self, host: str, port: int, pool_token: bytes, timeout_s: float = 5.0):
        self.addr, self.pool_token, self.timeout_s = (host, port), pool_token, timeout_s
        self.sock: socket.socket | None = None
        self.token = 0
        self.seq = 0
        self.lock = threading.Lock()  # the heartbeat thread pings through the same connection

    def _connect(self) -> None:
        try:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first = self._read_reply()
            if first.status != Status.OK or len(first.payload) != CHALLENGE_BYTES:
                self._drop()
                raise PoolRefused(f"metadata server at {self.addr[0]}:{self.addr[1]} refused the connection: "
                                  f"{first.payload.decode(errors='replace')}")
            r = self._exchange(Op.HELLO, 0, (0, 0, 0, 0), proof(self.pool_token, first.payload))
        except OSError as e:  # timeouts and broken frames too
            self._drop()
            raise PoolUnavailable(f"cannot reach the metadata server at {self.addr[0]}:{self.addr[1]}: {e}") from e
        if r.status != Status.OK:
            self._drop()
            raise PoolRefused(f"metadata server refused HELLO: {r.payload.decode(errors='replace')} "
                              "(is token_file the pool's token?)")
        self.token = r.ret[2]

    def _read_reply(self, token: int = 0, seq: int = 0) -> Reply:
        status, rn, rtoken, rseq, r0, r1, r2, r3, plen = RESP_FRAME.unpack(recv_exact(self.sock, RESP_FRAME.size))
        if plen > MAX_PAYLOAD or rtoken != token or rseq != seq:
            raise ConnectionError(f"a reply breaks the protocol (length {plen}, seq {rseq} for {seq})")
        return Reply(status, rn, (r0, r1, r2, r3), recv_exact(self.sock, plen) if plen else b"")

    def _exchange(self, op: Op, n: int, args, data: bytes) -> Reply:
        self.seq += 1
        self.sock.sendall(REQ_FRAME.pack(int(op), n, self.token, self.seq, *args, len(data)) + data)
        return self._read_reply(self.token, self.seq)

    def call(self, op: Op, n: int, args, payload: bytes | np.ndarray) -> Reply:
        data = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
        with self.lock:
            if self.sock is None:
                self._connect()  # raises only PoolError
            try:
                return self._exchange(op, n, args, data)
            except OSError as e:  # timeouts too: the session ends with the connection, leases and all
                self._drop()
                raise PoolUnavailable(f"metadata server connection failed: {e}") from e

    def hello(self) -> int:
        with self.lock:
            self._drop()
            self._connect()
            return self.token

    def beat(self) -> None:
        """Heartbeat: a PING, if a session is open (an idle connection is closed by the server)."""
        if self.sock is not None:
            try:
                self.call(Op.PING, 0, (0, 0, 0, 0), b"")
            except (PoolUnavailable, PoolRefused):
                pass  # the next real call reconnects

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.token = None, 0

    def close(self) -> None:
        with self.lock:
            self._drop()

