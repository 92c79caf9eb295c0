"""An ASGI middleware that vLLM's API server loads (`--middleware beluga.workers.guard.RequireKey`) so that
a worker answers only the router, which holds the workers' key.

vLLM's own `--api-key` guards its /v1 routes only; others that generate text (/invocations) or reveal it
(/tokenize, /detokenize) stay open. This guard asks for the key on every path but the health check and
the metrics scrape, which carry no prompt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

OPEN_PATHS = frozenset({"/health", "/metrics", "/ping"})


class RequireKey:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.digest is None or scope["path"] in OPEN_PATHS \
                or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.digest):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "this worker answers its router only (a worker key is needed)",
                                     "type": "authentication_error", "param": None, "code": "invalid_api_key"}})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})
