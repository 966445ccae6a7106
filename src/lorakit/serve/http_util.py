"""What the HTTP routes share: the OpenAI-style error answer and reading a JSON body within the size limit.
(No `from __future__ import annotations`: FastAPI reads route signatures at runtime.)"""

import json

from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import Conflict, EngineError, InvalidRequest, NotAllowed, NotFound

HTTP_STATUS = {InvalidRequest: (400, "invalid_request_error"), NotAllowed: (403, "permission_error"),
               NotFound: (404, "invalid_request_error"), Conflict: (409, "invalid_request_error")}


class APIError(Exception):
    """An HTTP error answer: status, message, OpenAI-style code and type."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    @classmethod
    def from_engine(cls, e: EngineError) -> "APIError":
        status, kind = HTTP_STATUS[type(e)]
        return cls(status, e.message, e.code, kind)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}},
                        status_code=e.status)


async def read_json(engine, request: Request) -> dict:
    limit = engine.config.max_body_bytes
    too_large = APIError(413, f"request body exceeds {limit} bytes", "body_too_large")
    if int(request.headers.get("content-length") or 0) > limit:  # refuse before reading it
        raise too_large
    raw = await request.body()
    if len(raw) > limit:  # no or false Content-Length
        raise too_large
    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg}", "invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "request body is not UTF-8 text", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return body
