"""Client <-> metadata server calls: one message format, two transports.

Shared memory (the fast path): each client owns one RPC slot in the pool. A slot has a line the client
writes (request sequence number, owner pid, op, args), a line only the server writes (response sequence,
status, results) and one payload area per direction. No word has two writers. The client publishes a
request by a release-store of a new sequence number; the server answers by a release-store of the same
number in its own line. The server polls; when idle it parks on a doorbell (a Unix datagram socket) so
that it does not hold a core, and a client rings the bell when it sees the server parked.

TCP (for comparison, and for clients that cannot map the pool): the same messages, length-prefixed.

The RPC area assumes its flag lines are coherent between the processes that use it (one host, or
hardware-coherent memory); across non-coherent CXL hosts, clients use TCP for calls and the pool for data.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

from beluga.cxlpool import native
from beluga.cxlpool.layout import RPC_HEAD, RPC_PAYLOAD, SERVER_STATUS, Geometry


class Op(enum.IntEnum):
    HELLO = 1
    LOOKUP = 2  # args[0]: 1 to take a lease; payload: keys -> slots u32[], gens u32[]
    ALLOC = 3  # payload: keys -> slots i64[] (-1: no room, -2: already stored), gens u32[]
    COMMIT = 4  # payload: (slot u32, gen u32, checksum u64)[] -> ok u8[]
    ABORT = 5  # payload: (slot u32, gen u32)[]
    RELEASE = 6  # payload: slots u32[]
    STATS = 7  # -> JSON
    BAD = 8  # payload: (slot u32, gen u32)[]: a reader found a checksum mismatch


class PoolUnavailable(RuntimeError):
    """The metadata server did not answer in time. The caller should compute instead of waiting."""


@dataclass
class Reply:
    status: int
    n: int
    ret: tuple[int, int, int, int]
    payload: bytes


_REQ = struct.Struct("<IIQQQQI")  # op, n, args[4], payload length
_RESP = struct.Struct("<iIQQQQI")  # status, n, ret[4], payload length

# word indices (uint64) inside one RPC slot; the full list is in `native`, which reads and writes them
W_REQ_SEQ, W_OWNER, W_RESP_SEQ = native.W_REQ_SEQ, native.W_OWNER, native.W_RESP_SEQ


def doorbell_path(pool_path: str) -> str:
    """Where the server's doorbell socket lives: beside a pool file, or under /dev/shm for a DAX node."""
    if pool_path.startswith("/dev/dax"):
        return f"/dev/shm/beluga-{os.path.basename(pool_path)}.bell"
    return pool_path + ".bell"


class ShmTransport:
    """Client end of the shared-memory RPC: claims a free slot, then calls through it."""

    def __init__(self, mem: np.ndarray, geo: Geometry, bell: str, timeout_s: float = 5.0,
                 spins: int = 20000):
        self.mem, self.geo, self.bell, self.timeout_s, self.spins = mem, geo, bell, timeout_s, spins
        self.base = native.address(mem)
        self.status = np.ndarray(1, SERVER_STATUS, buffer=mem, offset=4096)
        self.slot = self._claim()
        off = geo.rpc_off + self.slot * geo.rpc_bytes
        self.words = np.ndarray(RPC_HEAD // 8, np.uint64, buffer=mem, offset=off)
        self.req_payload = mem[off + RPC_HEAD: off + RPC_HEAD + RPC_PAYLOAD]
        self.resp_payload = mem[off + RPC_HEAD + RPC_PAYLOAD: off + RPC_HEAD + 2 * RPC_PAYLOAD]
        self.slot_addr = self.base + off
        self.resp_addr = self.base + off + W_RESP_SEQ * 8
        self.out = np.zeros(6, np.uint64)
        self.seq = int(self.words[W_RESP_SEQ])
        self._bell_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._bell_sock.setblocking(False)

    def _claim(self) -> int:
        pid = os.getpid()
        for c in range(self.geo.n_clients):
            addr = self.base + self.geo.rpc_off + c * self.geo.rpc_bytes + W_OWNER * 8
            owner = int(native.atomic_load(addr))
            if owner and owner != pid and _alive(owner):
                continue
            if int(native.atomic_cas(addr, np.uint64(owner), np.uint64(pid))) == owner:
                return c
        raise PoolUnavailable(f"all {self.geo.n_clients} RPC slots of the pool are taken by live "
                              "processes; create the pool with more --clients")

    def call(self, op: Op, n: int = 0, args=(0, 0, 0, 0), payload: bytes | np.ndarray = b"") -> Reply:
        nbytes = len(payload) if isinstance(payload, bytes | bytearray) else payload.nbytes
        if nbytes > RPC_PAYLOAD:
            raise ValueError(f"RPC payload of {nbytes} bytes exceeds {RPC_PAYLOAD}; split the call")
        if nbytes:
            data = np.frombuffer(payload, np.uint8) if isinstance(payload, bytes | bytearray) else payload
            self.req_payload[:nbytes] = data.view(np.uint8).ravel()
        self.seq += 1
        a0, a1, a2, a3 = args
        if not native.client_call(self.slot_addr, int(op) | (n << 32), a0, a1, a2, a3, nbytes, self.seq, self.spins,
                                  self.out):
            self._wait_slow(np.uint64(self.seq))
            native.read_reply(self.slot_addr, self.out)
        sn, r0, r1, r2, r3, rlen = self.out.tolist()
        status = sn & 0xFFFFFFFF
        if status >= 1 << 31:
            status -= 1 << 32
        return Reply(status, sn >> 32, (r0, r1, r2, r3), self.resp_payload[:rlen].tobytes() if rlen else b"")

    def _wait_slow(self, seq) -> None:
        deadline = time.monotonic() + self.timeout_s
        pause = 20e-6
        while True:
            if self.status["sleeping"][0]:
                try:
                    self._bell_sock.sendto(b"!", self.bell)
                except OSError:
                    pass  # no server bound: the timeout below reports it
            if native.wait_for_value(self.resp_addr, seq, self.spins):
                return
            if time.monotonic() > deadline:
                raise PoolUnavailable(
                    f"metadata server did not answer within {self.timeout_s}s; is `beluga pool serve` "
                    "running for this pool?")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    def close(self) -> None:
        addr = self.base + self.geo.rpc_off + self.slot * self.geo.rpc_bytes + W_OWNER * 8
        native.atomic_cas(addr, np.uint64(os.getpid()), np.uint64(0))
        self._bell_sock.close()


class TcpTransport:
    """Client end of the TCP transport: same messages over a loopback (or LAN) socket."""

    def __init__(self, host: str, port: int, timeout_s: float = 5.0):
        self.addr, self.timeout_s = (host, port), timeout_s
        self.sock = None
        self._connect()

    def _connect(self) -> None:
        try:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout_s)
        except OSError as e:
            raise PoolUnavailable(f"cannot reach the metadata server at {self.addr[0]}:{self.addr[1]}: {e}") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, op: Op, n: int = 0, args=(0, 0, 0, 0), payload: bytes | np.ndarray = b"") -> Reply:
        data = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
        try:
            self.sock.sendall(_REQ.pack(int(op), n, *args, len(data)) + data)
            head = _recv_exact(self.sock, _RESP.size)
            status, rn, r0, r1, r2, r3, plen = _RESP.unpack(head)
            body = _recv_exact(self.sock, plen) if plen else b""
        except OSError as e:
            self.sock.close()
            self._connect()  # next call goes to a restarted server
            raise PoolUnavailable(f"metadata server connection failed: {e}") from e
        return Reply(status, rn, (r0, r1, r2, r3), body)

    def close(self) -> None:
        if self.sock:
            self.sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def read_tcp_request(sock: socket.socket) -> tuple[Op, int, tuple, bytes] | None:
    try:
        head = _recv_exact(sock, _REQ.size)
    except ConnectionError:
        return None
    op, n, a0, a1, a2, a3, plen = _REQ.unpack(head)
    return Op(op), n, (a0, a1, a2, a3), _recv_exact(sock, plen) if plen else b""


def write_tcp_reply(sock: socket.socket, reply: Reply) -> None:
    sock.sendall(_RESP.pack(reply.status, reply.n, *reply.ret, len(reply.payload)) + reply.payload)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
