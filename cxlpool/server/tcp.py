"""Server end of the TCP transport: one connection is one client session, opened only by a HELLO that
proves knowledge of the pool token (an HMAC of a fresh challenge, so the token never crosses the wire).

Bounded: frames over `MAX_PAYLOAD` close the connection, a connection that sends nothing for the heartbeat
timeout is closed (clients PING more often), a handshake must finish within `HANDSHAKE_S`, and at most
`max_connections` are open at once.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import socketserver
import threading
import time

from beluga.cxlpool.protocol import (
    CHALLENGE_BYTES,
    MAX_PAYLOAD,
    PROOF_BYTES,
    REQ_FRAME,
    RESP_FRAME,
    Op,
    Reply,
    Status,
    proof,
    recv_exact,
)
from beluga.cxlpool.server.dispatch import Dispatcher

log = logging.getLogger(__name__)

HANDSHAKE_S = 5.0


class TcpEndpoint(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, dispatch: Dispatcher, pool_token: bytes, idle_timeout_s: float,
                 max_connections: int):
        self.dispatch, self.pool_token, self.idle_timeout_s = dispatch, pool_token, idle_timeout_s
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), _Handler)


def send_reply(sock: socket.socket, reply: Reply, token: int, seq: int) -> None:
    sock.sendall(RESP_FRAME.pack(reply.status, reply.n, token, seq, *reply.ret, len(reply.payload)) + reply.payload)


class _Handler(socketserver.BaseRequestHandler):
    server: TcpEndpoint

    def handle(self):
        srv, sock = self.server, self.request
        if not srv.slots.acquire(blocking=False):
            send_reply(sock, Reply.error("too many connections to the metadata server"), 0, 0)
            return
        token = 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HANDSHAKE_S)
            challenge = secrets.token_bytes(CHALLENGE_BYTES)
            send_reply(sock, Reply(int(Status.OK), payload=challenge), 0, 0)
            # The whole handshake has one deadline: a peer without the token cannot trickle bytes to hold a
            # connection, and before it proves the token nothing but a HELLO of the proof's size is read.
            deadline = time.monotonic() + HANDSHAKE_S
            while True:
                head = recv_exact(sock, REQ_FRAME.size, None if token else deadline)
                op, n, req_token, seq, a0, a1, a2, a3, plen = REQ_FRAME.unpack(head)
                if plen > MAX_PAYLOAD:
                    send_reply(sock, Reply.error(f"frame of {plen} bytes over the cap of {MAX_PAYLOAD}"), req_token,
                               seq)
                    return
                if not token:
                    proved = op == Op.HELLO and plen == PROOF_BYTES and hmac.compare_digest(
                        recv_exact(sock, plen, deadline), proof(srv.pool_token, challenge))
                    if not proved:
                        log.warning("TCP client %s failed to authenticate", self.client_address)
                        send_reply(sock, Reply.error("HELLO with a valid proof of the pool token first",
                                                     Status.AUTH), req_token, seq)
                        return
                    token = srv.dispatch.open_session(f"tcp:{self.client_address[0]}:{self.client_address[1]}")
                    sock.settimeout(srv.idle_timeout_s)
                    send_reply(sock, srv.dispatch.hello_reply(token), req_token, seq)
                    continue
                payload = recv_exact(sock, plen) if plen else b""
                if req_token != token:  # a connection speaks for its own session only
                    reply = Reply.error("this connection's session has another token", Status.EXPIRED)
                else:
                    reply = srv.dispatch(token, op, n, (a0, a1, a2, a3), payload)
                send_reply(sock, reply, req_token, seq)
        except (OSError, ConnectionError, TimeoutError) as e:
            log.info("TCP client %s dropped: %s", self.client_address, e)
        finally:
            srv.slots.release()
            if token:
                srv.dispatch.close_session(token, "connection closed")
