"""uvicorn's h11 protocol, answering the requests h11 refuses before they reach the app as foveal does.

Design decisions:
- h11 stops a request head that grows past `max_header_bytes` while it arrives ("Receive buffer too
  long", status hint 431). uvicorn answers every such refusal with a text/plain 400 and closes at
  once; a client still sending its head then gets a reset instead of the answer. Here the answer
  is the JSON error body of every other refusal (the OpenAI shape when the request line names a
  /v1 path) with the status h11 names, and the connection is half-closed and drained for a moment
  before it closes (a lingering close, as nginx and Apache do), so the kernel does not reset it
  over unread bytes.
- A head that arrived whole in one read never trips h11's check, so Guard (security.py) measures
  it too: the limit holds whatever the TCP segmentation.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE   # as uvicorn imports it
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError, error_body, header_too_large, is_openai

LINGER_S = 2.0      # how long a refused connection is drained before it closes


class _Connection(h11.Connection):
    """Keeps the status hint of the last protocol error (uvicorn catches the exception and drops it)."""
    error_status_hint = 400

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error_status_hint = e.error_status_hint
            raise


def _request_path(buffered: bytes) -> str:
    line = buffered.split(b"\r\n", 1)[0].split(b" ")
    return line[1].split(b"?")[0].decode("latin-1") if len(line) >= 2 else ""


class FovealH11Protocol(H11Protocol):
    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.header_limit = config.h11_max_incomplete_event_size
        self.conn = _Connection(h11.SERVER, self.header_limit or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        self._draining = False

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return          # the rest of a refused request
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self.conn.error_status_hint == 431:
            err = header_too_large(self.header_limit)
        else:
            err = APIError(400, "invalid HTTP request: the request line or a header is malformed",
                           "invalid_request_error")
        body = json.dumps(error_body(err, is_openai(_request_path(self.conn.trailing_data[0])))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=err.status, headers=headers,
                                       reason=HTTPStatus(err.status).phrase.encode()),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:      # our side cannot answer in this state: close as uvicorn would
            self.transport.close()
            return
        self._draining = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
