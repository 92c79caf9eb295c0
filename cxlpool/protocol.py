"""The wire protocol between pool clients and the metadata server: the one definition that the client,
the server's Python dispatcher, its compiled loop (`fastpath`) and both transports read.

A message is: op, count n, session token, sequence number, four integer arguments, a payload of at most
`MAX_PAYLOAD` bytes. A reply is: status, count, the token and sequence of the request it answers, four
integer results, a payload. The shared-memory transport writes these as words of an RPC slot in the pool;
TCP sends them as frames (`REQ_FRAME`, `RESP_FRAME`).

Identity: a client claims an RPC slot (shared memory) or opens a connection (TCP) and says HELLO; the
server answers with a random 63-bit session token that every later request carries. The server reaps a
session whose heartbeat stops (never by process id: pids mean nothing across PID namespaces or hosts).
A shared-memory HELLO carries the slot's claim word as its token, and the server answers it only if the
slot is still claimed so: a client that lost its slot can never open a session on another's. TCP HELLO
proves knowledge of the pool token instead (an HMAC over the server's challenge).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

KEY_BYTES = 32
MAX_PAYLOAD = 64 * 1024  # per direction and call: 2,048 block keys

# -- shared-memory RPC slot: word (uint64) indices --------------------------------------------------------
# Line 0, written by the client only: the request.
W_REQ_SEQ, W_TOKEN, W_OPN, W_ARGS, W_PLEN = 0, 1, 2, 3, 7
# Line 1, the client's: W_CLAIM holds the claim (a random nonce) of the client object using the slot,
# taken by compare-and-swap from 0; the server swaps it back to 0 when it reaps the session. W_BEAT is the
# client's heartbeat counter.
W_CLAIM, W_BEAT = 8, 9
# Line 2, written by the server only: the reply.
W_RESP_SEQ, W_STATUS, W_RET, W_RLEN, W_RESP_TOKEN = 16, 17, 18, 22, 23
SLOT_HEAD_BYTES = 192  # three cache lines
SLOT_BYTES = SLOT_HEAD_BYTES + 2 * MAX_PAYLOAD  # head, request payload, reply payload


class Op(enum.IntEnum):
    HELLO = 1  # shm: token = the claim, no payload; tcp: payload = proof (`proof`). -> ret: n_slots, server id, token
    LOOKUP = 2  # args[0]: 1 to lease; payload: keys -> n hits; payload: slots u32[n], gens u32[n]
    ALLOC = 3  # payload: keys -> payload: slots i64[n] (ALLOC_NO_ROOM, ALLOC_EXISTS), gens u32[n]
    COMMIT = 4  # args[0]: block length; payload: COMMIT_REC[n] -> ret[0]: accepted; payload: ok u8[n]. The
    # record names the key the writer wrote: a slot allocated under another key is refused, never published
    ABORT = 5  # payload: PAIR_REC[n]
    RELEASE = 6  # payload: slots u32[n]
    STATS = 7  # -> payload: JSON
    BAD = 8  # payload: PAIR_REC[n]: a reader found a checksum mismatch
    PING = 9  # heartbeat over TCP (shared memory beats a word instead)


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1  # malformed or refused request: nothing changed; the payload says why (UTF-8)
    EXPIRED = 2  # the token names no live session (reaped, or the server restarted): say HELLO again
    AUTH = 3  # HELLO without a valid proof of the pool token


ALLOC_NO_ROOM, ALLOC_EXISTS = -1, -2

# Per-op payload records.
COMMIT_REC = np.dtype([("slot", "<u4"), ("gen", "<u4"), ("csum", "<u8"), ("key", "V32")])
PAIR_REC = np.dtype([("slot", "<u4"), ("gen", "<u4")])

# The largest n each op may carry, and the exact request payload size it must come with: checked before
# any effect, so a malformed request changes nothing (and no request holds the server for long).
MAX_N = {
    Op.HELLO: 0, Op.LOOKUP: MAX_PAYLOAD // KEY_BYTES, Op.ALLOC: MAX_PAYLOAD // KEY_BYTES,
    Op.COMMIT: MAX_PAYLOAD // COMMIT_REC.itemsize, Op.ABORT: MAX_PAYLOAD // PAIR_REC.itemsize,
    Op.RELEASE: MAX_PAYLOAD // 4, Op.STATS: 0, Op.BAD: MAX_PAYLOAD // PAIR_REC.itemsize, Op.PING: 0,
}
REQ_ITEM_BYTES = {
    Op.HELLO: 0, Op.LOOKUP: KEY_BYTES, Op.ALLOC: KEY_BYTES, Op.COMMIT: COMMIT_REC.itemsize,
    Op.ABORT: PAIR_REC.itemsize, Op.RELEASE: 4, Op.STATS: 0, Op.BAD: PAIR_REC.itemsize, Op.PING: 0,
}


def check_request(op: int, n: int, plen: int) -> str | None:
    """Why a request's shape is invalid, or None. HELLO may carry a proof (TCP) of `PROOF_BYTES`."""
    try:
        op = Op(op)
    except ValueError:
        return f"unknown op {op}"
    if not 0 <= n <= MAX_N[op]:
        return f"{op.name}: n={n} outside 0..{MAX_N[op]}; split the call"
    want = n * REQ_ITEM_BYTES[op]
    if op == Op.HELLO and plen in (0, PROOF_BYTES):
        return None
    if plen != want:
        return f"{op.name}: payload of {plen} bytes, {n} items need exactly {want}"
    return None


# -- TCP frames ---------------------------------------------------------------------------------------------
REQ_FRAME = struct.Struct("<IIQQQQQQI")  # op, n, token, seq, args[4], payload length
RESP_FRAME = struct.Struct("<iIQQQQQQI")  # status, n, token, seq, ret[4], payload length
CHALLENGE_BYTES = 32  # the server's first frame's payload on a new connection
PROOF_BYTES = 32


def proof(pool_token: bytes, challenge: bytes) -> bytes:
    """What a TCP client sends in HELLO: an HMAC of the server's challenge under the pool token, so the
    token itself never crosses the wire."""
    return hmac.new(pool_token, b"beluga-hello:" + challenge, hashlib.sha256).digest()


@dataclass
class Reply:
    status: int
    n: int = 0
    ret: tuple[int, int, int, int] = (0, 0, 0, 0)
    payload: bytes = b""

    @classmethod
    def error(cls, why: str, status: Status = Status.ERROR) -> Reply:
        return cls(int(status), payload=why.encode()[:MAX_PAYLOAD])


def doorbell_path(pool_path: str) -> str:
    """Where the server's doorbell socket lives: beside a pool file, or under /dev/shm for a DAX node."""
    if pool_path.startswith("/dev/dax"):
        return f"/dev/shm/beluga-{os.path.basename(pool_path)}.bell"
    return pool_path + ".bell"


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Read one frame's n bytes (frames are capped, so n is bounded). With a deadline (monotonic), the
    whole read must finish by then: a peer trickling bytes cannot hold the connection."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("peer too slow")
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)
