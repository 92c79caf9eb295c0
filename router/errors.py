"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 502: "api_error", 503: "api_error",
         504: "api_error"}


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code}}


def response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, code, param), status_code=status)


def sse_event(status: int, message: str, code: str | None = None) -> bytes:
    """An error as a server-sent event, for a stream that already started."""
    return f"data: {json.dumps(body(status, message, code))}\n\ndata: [DONE]\n\n".encode()
