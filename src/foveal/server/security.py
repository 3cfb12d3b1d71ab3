"""One pure-ASGI middleware in front of every route: Host allow-list, bearer auth, body size limit,
access log and request metrics.

Design decisions:
- Pure ASGI (not BaseHTTPMiddleware) so streaming responses and client disconnects pass through
  untouched.
- Host header allow-list against DNS rebinding: loopback names and addresses always; when bound to
  a non-loopback address, also that address and any IP literal; plus the operator's extra names
  ("*" allows every host). Checked before auth, on every route.
- The API key is compared with `hmac.compare_digest`; `/health` stays open for probes, and so does
  the static web page (server/web.py: the same bytes for everyone, no data). CORS
  preflight (OPTIONS with an Origin) passes to the CORS middleware, which sits inside this one.
- The body limit is enforced twice: on Content-Length at once, and on the bytes actually received
  (chunked uploads), raising `BodyTooLarge`, which the app maps to 413.
- The header limit (request line + headers, `max_header_bytes`) is h11's while a head arrives
  (server/protocol.py answers that case) and measured here on a head that arrived whole: 431.
- Access log: one JSON line per request on the `foveal.server.access` logger.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time

from .config import ServerConfig, is_loopback
from .errors import APIError, BodyTooLarge, error_body, header_too_large, is_openai
from .metrics import Metrics
from .web import PREFIX as WEB_PREFIX, is_public_page

access_log = logging.getLogger("foveal.server.access")
OPEN_PATHS = {"/health"}
KNOWN_ROUTES = {"/", "/health", "/metrics", "/api/version", "/api/tags", "/api/show", "/api/ps",
                "/api/generate", "/api/chat", "/v1/models", "/v1/chat/completions", "/openapi.json", "/docs",
                "/api/v1/analyze"}


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):                      # [::1]:port
        return h[1:h.index("]")] if "]" in h else h
    if h.count(":") == 1:
        return h.split(":")[0]
    return h


def host_allowed(host_header: str | None, config: ServerConfig) -> bool:
    if "*" in config.allowed_hosts:
        return True
    if not host_header:
        return False
    name = _host_name(host_header)
    if name in {h.lower() for h in config.allowed_hosts}:
        return True
    if name == "localhost" or name.endswith(".localhost") or is_loopback(name):
        return True
    if not is_loopback(config.host):
        if name == config.host.strip("[]").lower():
            return True
        try:
            ipaddress.ip_address(name)
            return True                         # reached by address: no DNS name to rebind
        except ValueError:
            return False
    return False


def _as_json(scope, headers: dict):
    """Like Ollama, read a POST body as JSON whatever its Content-Type (`curl -d` sends a form type)."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json") or ctype.startswith("multipart/"):
        return scope
    raw = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
    return {**scope, "headers": raw + [(b"content-type", b"application/json")]}


def _head_bytes(scope) -> int:
    """The size of the request head as it came on the wire (HTTP/1.1): request line, headers, blank line."""
    target = len(scope.get("raw_path") or scope.get("path", "").encode())
    if scope.get("query_string"):
        target += 1 + len(scope["query_string"])
    line = len(scope.get("method", "")) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", [])) + 2


class Guard:
    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in KNOWN_ROUTES else WEB_PREFIX if path.startswith(WEB_PREFIX) else "other"
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        status_box = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            err = self._check(scope, path, headers)
            if err is not None:
                await self._reject(err, path, send_wrapper)
                return
            if scope.get("method") == "POST":
                scope = _as_json(scope, headers)
            flags = {}
            scope = {**scope, "foveal": flags}
            await self.app(scope, self._limited(receive, flags), send_wrapper)
        finally:
            status = status_box["status"]
            dt = time.perf_counter() - t0
            self.metrics.inc("foveal_requests_total", route=route, status=status)
            self.metrics.observe("foveal_request_duration_seconds", dt, route=route)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                access_log.info(json.dumps({"ts": time.time(), "client": client[0], "method": scope.get("method"),
                                            "path": path, "status": status, "duration_ms": round(dt * 1e3, 2)}))

    def _check(self, scope, path: str, headers: dict) -> APIError | None:
        if _head_bytes(scope) > self.config.max_header_bytes:
            return header_too_large(self.config.max_header_bytes)
        if not host_allowed(headers.get("host"), self.config):
            host = headers.get("host", "")
            shown = host if len(host) <= 80 else host[:80] + "..."
            return APIError(403, f"Host header {shown!r} is not allowed (DNS rebinding protection); the "
                                 f"operator can allow it with --allowed-host", "host_not_allowed")
        preflight = scope.get("method") == "OPTIONS" and "origin" in headers and self.config.cors_origins
        if self._key is not None and path not in OPEN_PATHS and not preflight \
                and not is_public_page(scope.get("method", ""), path):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return APIError(400, "Content-Length header is not a number", "invalid_request_error")
            if int(length) > self.config.max_body_bytes:
                return APIError(413, f"request body is {int(length)} bytes, over the limit of "
                                     f"{self.config.max_body_bytes} bytes", "body_too_large")
        return None

    async def _reject(self, err: APIError, path: str, send) -> None:
        self.metrics.inc("foveal_errors_total", kind=err.kind)
        body = json.dumps(error_body(err, is_openai(path))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _limited(self, receive, scope_flags):
        limit, seen = self.config.max_body_bytes, [0]

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    scope_flags["too_large"] = True
                    raise BodyTooLarge(limit)
            return message
        return wrapped
