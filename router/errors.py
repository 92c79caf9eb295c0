"""The one place error bodies are made: OpenAI's {"error": {"message", "type", "param", "code"}}.

Anything the router refuses raises `ApiError` (or is one of FastAPI's own errors: an unknown path, a wrong
method); `install` turns each into that body, so no client ever sees another shape. An exception nobody
expected is still a 500 in the same shape, with no internals in it.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 502: "api_error", 503: "api_error", 504: "api_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 close: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.close = close  # end the connection after the answer (the client's body was not read whole)


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code}}


def response(status: int, message: str, code: str | None = None, param: str | None = None,
             close: bool = False) -> JSONResponse:
    return JSONResponse(body(status, message, code, param), status_code=status,
                        headers={"connection": "close"} if close else None)


def sse_event(status: int, message: str, code: str | None = None) -> bytes:
    """An error as a server-sent event, for a stream that already started."""
    return f"data: {json.dumps(body(status, message, code))}\n\ndata: [DONE]\n\n".encode()


def from_validation(errors: list[dict], body=None) -> ApiError:
    """Pydantic's most telling complaint, as OpenAI words it: the dotted path of the field in `param`.

    For a value that fits no branch of a union (`content` is a string or a list of parts), pydantic
    complains once per branch; the deepest complaint is the one about what the client meant, and a broken
    bound says more than a wrong type. Branch labels in the path ("list[str]", a part's tag) are dropped by
    walking the path through the body itself."""
    err = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    param, node = [], body
    for i, step in enumerate(err["loc"]):
        if isinstance(node, dict) and step in node or isinstance(node, list) and isinstance(step, int):
            param.append(str(step))
            node = node[step] if isinstance(node, dict) or step < len(node) else None
        elif i == len(err["loc"]) - 1 and isinstance(node, dict):
            param.append(str(step))  # a missing field
    path = ".".join(param) or None
    return ApiError(400, f"{path}: {err['msg']}" if path else err["msg"], "invalid_request", path)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return response(e.status, e.message, e.code, e.param, e.close)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return response(e.status_code, str(e.detail), None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return response(400, "Invalid request: " + "; ".join(str(x["msg"]) for x in e.errors()), "invalid_request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return response(500, "Internal error in the router.", "internal_error")
