"""What a client can make the router hold: bytes of a request body, and time for a request's head and body.

uvicorn bounds a head's size (h11) and the idle time between requests (keep-alive), but not how long a head
or a body may take to arrive, and the router used to buffer a body whole before it looked at its size (a
300 MiB chunked body took the router from 82 to 626 MB before its 413). Here:
- `BodyLimits` counts a body as it arrives and refuses it (413) at the first chunk past the limit, and
  gives the whole body `body_timeout_s` from the end of the head (408);
- `HeadDeadlineH11` gives each request's head `head_timeout_s` from the connection, or from the previous
  answer on a kept-alive connection;
- an answer sent before the body was read to its end closes the connection, so the unread rest cannot
  keep it open either.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from beluga.router import errors
from beluga.router.settings import RouterSettings


class BodyLimits:
    """ASGI middleware around the whole app: every route's body is limited, not only the proxied ones."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        chunked = b"transfer-encoding" in headers
        length = None if chunked else int(headers.get(b"content-length", 0))  # h11 checked: 1 to 20 digits
        read, done = 0, not chunked and not length
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive():
            nonlocal read, done
            if done:  # the body is in; what is left to receive is the client's disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise errors.ApiError(408, f"The request body did not arrive within {self.timeout_s:g} s.",
                                      "body_timeout") from None
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise errors.ApiError(413, f"Request body over {self.max_bytes} bytes.", "body_too_large")
                done = not message.get("more_body", False)
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if length and length > self.max_bytes:  # said up front: refused before a byte of it is read
            too_big = errors.response(413, f"Request body over {self.max_bytes} bytes.", "body_too_large")
            return await too_big(scope, receive, closing_send)
        await self.app(scope, limited_receive, closing_send)


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's head. uvicorn's own keep-alive timer stops
    at the first byte a client sends, so a head trickled a byte at a time used to hold its connection
    forever. The deadline is armed when the connection opens and after each answer; it closes the
    connection if no new request head has arrived since (a new head makes a new request cycle)."""

    head_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm(None)

    def on_response_complete(self):
        answered = self.cycle
        super().on_response_complete()  # may start a pipelined request at once: that one has its head
        self._arm(answered)

    def connection_lost(self, exc):
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self, cycle) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._expire, cycle)

    def _expire(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, s: RouterSettings, log_level: str = "warning") -> uvicorn.Config:
    """The router's server: h11 (its size limits are settings), the head deadline, keep-alive and a cap
    on connections. Everything that runs the router (CLI, `beluga serve`, tests, bench) starts it so."""
    protocol = type("RouterH11", (HeadDeadlineH11,), {"head_timeout_s": s.head_timeout_s})
    return uvicorn.Config(app, host=s.host, port=s.port, http=protocol, log_level=log_level, access_log=False,
                          timeout_keep_alive=s.keep_alive_s, h11_max_incomplete_event_size=s.max_header_bytes,
                          limit_concurrency=s.max_connections)
