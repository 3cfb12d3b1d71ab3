"""HTTP errors: every failure becomes a 4xx (or a bare 500) JSON body that names the problem.

Design decisions:
- One exception type, `APIError`, carries status, message and a short `kind` (the metrics label
  and the OpenAI `type`). foveal's own typed errors map onto it in `from_foveal`.
- The body shape follows the API the client called: Ollama `{"error": "..."}`, OpenAI
  `{"error": {"message", "type", "param", "code"}}`.
- Messages never carry a traceback, a repr of an internal object or a memory address; an
  unexpected exception becomes "internal error" with the detail only in the server log.
"""

from __future__ import annotations

import json
import logging
import re

from starlette.responses import JSONResponse

from ..errors import (ConfigError, ContextLengthError, FovealError, ImageError, ModelNotFoundError, PromptError,
                      SamplingError)

log = logging.getLogger("foveal.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers, self.extra = headers or {}, extra or {}


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body is over the limit of {limit} bytes")
        self.limit = limit


def header_too_large(limit: int) -> APIError:
    return APIError(431, f"request headers are over the limit of {limit} bytes (request line and headers)",
                    "header_too_large")


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean(message: str, limit: int = 600) -> str:
    """No memory addresses, bounded length: messages may quote user input."""
    message = _ADDRESS.sub("", str(message))
    return message if len(message) <= limit else message[:limit] + "..."


def from_foveal(e: FovealError) -> APIError:
    if isinstance(e, ContextLengthError):
        return APIError(400, clean(str(e)), "context_length_exceeded",
                        extra={"needed_tokens": e.needed, "context_length": e.available})
    if isinstance(e, ModelNotFoundError):
        return APIError(404, clean(str(e)), "model_not_found")
    kind = ("image_error" if isinstance(e, ImageError) else "sampling_error" if isinstance(e, SamplingError)
            else "prompt_error" if isinstance(e, PromptError) else "config_error" if isinstance(e, ConfigError)
            else "invalid_request_error")
    return APIError(400, clean(str(e)), kind)


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(err: APIError, openai: bool) -> dict:
    if openai:
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.kind}}
        body["error"].update(err.extra)
        return body
    return {"error": err.message, **err.extra}


def error_response(err: APIError, path: str) -> JSONResponse:
    return JSONResponse(error_body(err, is_openai(path)), status_code=err.status, headers=err.headers)


def error_line(err: APIError, openai: bool) -> bytes:
    """An error after streaming began: one last NDJSON line / SSE event."""
    body = json.dumps(error_body(err, openai))
    return f"data: {body}\n\n".encode() if openai else (body + "\n").encode()


def as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, FovealError):
        return from_foveal(e)
    if isinstance(e, BodyTooLarge):
        return APIError(413, str(e), "body_too_large")
    log.error("internal error", exc_info=e)
    return APIError(500, "internal error (the server log has the details)", "internal_error")


def describe_validation(errors) -> str:
    """pydantic / FastAPI validation errors -> one readable line naming the fields."""
    parts = []
    for err in list(errors)[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"request body is not valid JSON ({clean(ctx.get('error', 'parse error'), 120)})"
        if err.get("type") == "missing" and where == "body":
            return "request body is missing: send a JSON object"
        if err.get("type") == "missing":
            parts.append(f"field '{where}' is required")
        elif err.get("type") in ("model_attributes_type", "dict_type", "model_type") and where == "body":
            parts.append("request body must be a JSON object")
        else:
            parts.append(f"field '{where}': {clean(err.get('msg', 'invalid'), 200)}")
    return "; ".join(parts) or "invalid request"
