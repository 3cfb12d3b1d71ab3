"""Request headers over the server's limit: a 431 with the usual JSON error body, not a reset
connection, and the server goes on serving."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from test_server import MODEL, LiveServer, model_dir, vlm  # noqa: F401 (fixtures)

LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def server(vlm):
    with LiveServer(vlm, max_header_bytes=LIMIT) as s:
        yield s


def raw_request(url: str, request: bytes, pieces: int = 1) -> tuple[int, dict, bytes]:
    """Send bytes as they are (in `pieces` writes 0.2 s apart), read the whole answer: (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        step = -(-len(request) // pieces)
        for k in range(0, len(request), step):
            if k:
                time.sleep(0.2)
            sock.sendall(request[k:k + step])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_oversized_header_gets_431_json_on_a_raw_socket(server):
    request = (b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Foo: " + b"a" * (64 * 1024) + b"\r\n\r\n")
    status, headers, body = raw_request(server.url, request)
    assert status == 431
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    message = json.loads(body)["error"]
    assert "header" in message and str(LIMIT) in message


def test_header_growing_past_the_limit_while_it_arrives_gets_431_not_a_reset(server):
    """h11 refuses the head before it is complete; the client is still sending when the answer goes out."""
    request = (b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Foo: " + b"a" * (256 * 1024) + b"\r\n\r\n")
    status, headers, body = raw_request(server.url, request, pieces=8)
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body) == {"error": f"request headers are over the limit of {LIMIT} bytes (request line and headers)"}


def test_oversized_header_on_the_openai_route_gets_the_openai_error_shape(server):
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"X-Foo: " + b"a" * (64 * 1024) + b"\r\nContent-Length: 2\r\n\r\n{}")
    status, _, body = raw_request(server.url, request)
    assert status == 431
    error = json.loads(body)["error"]
    assert error["type"] == "header_too_large" and "header" in error["message"]


def test_httpx_sees_431_then_the_server_still_serves(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/api/tags", "/v1/models"):
            r = c.get(path, headers={"X-Foo": "a" * (64 * 1024)})
            assert r.status_code == 431, r.text
            assert "over the limit" in json.dumps(r.json())
        assert c.get("/api/tags", headers={"X-Foo": "a" * (LIMIT // 2)}).status_code == 200   # under the limit
        r = c.post("/api/generate", json={"model": MODEL, "prompt": "still fine?", "stream": False,
                                          "options": {"num_predict": 2}})
        assert r.status_code == 200 and r.json()["done"]
