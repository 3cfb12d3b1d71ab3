"""At least 150 bad requests across both APIs and the upload route: each must get its 4xx status and a JSON error body
naming the problem; afterwards the server is healthy and its memory did not grow by 256 MiB."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from test_server import MODEL, LiveServer, b64, bomb_png, image_root, model_dir, png_bytes, vlm  # noqa: F401 (fixtures)

psutil = pytest.importorskip("psutil")

PNG = png_bytes()
TRUNCATED = PNG[: len(PNG) // 2]
ONE_PIXEL = png_bytes((1, 1))
BOMB = bomb_png()
TEXT_FILE = b"just some text, not an image"
GIF_HEADER_ONLY = b"GIF89a\x10\x00\x10\x00" + b"\x00" * 22
MAX_BODY = 2 * 2**20


def ollama_cases(image_root):
    gen, chat = "/api/generate", "/api/chat"
    cases = []

    def both(body_gen, body_chat_msg_extra, status, needle, note):
        cases.append((f"gen {note}", "POST", gen, {"json": {"model": MODEL, "prompt": "hi", **body_gen}}, status,
                      needle))
        msg = {"role": "user", "content": "hi", **body_chat_msg_extra.pop("_msg", {})}
        cases.append((f"chat {note}", "POST", chat, {"json": {"model": MODEL, "messages": [msg],
                                                              **body_chat_msg_extra}}, status, needle))

    for path in (gen, chat):
        for raw, needle in ((b"{bad", "not valid json"), (b"{\"model\": ", "not valid json"), (b"", "body is missing"),
                            (b"[]", "json object"), (b"\"text\"", "json object"), (b"42", "json object"),
                            (b"null", "json object"), (b"\xff\xfe", "json"), (b"{'model': 'tiny'}", "not valid json"),
                            (b"{\"model\": \"tiny\",}", "not valid json")):
            cases.append((f"{path} raw {raw[:10]!r}", "POST", path, {"content": raw}, 400, needle))
        cases.append((f"{path} no model", "POST", path, {"json": {"prompt": "hi", "messages": []}}, 400, "model"))
        cases.append((f"{path} model int", "POST", path, {"json": {"model": 5, "prompt": "hi"}}, 400, "model"))
        cases.append((f"{path} model empty", "POST", path, {"json": {"model": "", "prompt": "hi"}}, 400, "model"))
        cases.append((f"{path} unknown model", "POST", path, {"json": {"model": "llava:13b", "prompt": "hi",
                                                                       "messages": []}}, 404, "not found"))
        cases.append((f"{path} stream str", "POST", path, {"json": {"model": MODEL, "prompt": "hi",
                                                                    "messages": [], "stream": "yes"}}, 400, "stream"))
        cases.append((f"{path} options list", "POST", path, {"json": {"model": MODEL, "prompt": "hi",
                                                                      "messages": [], "options": [1]}}, 400, "options"))
        cases.append((f"{path} keep_alive bad", "POST", path, {"json": {"model": MODEL, "prompt": "hi", "messages": [],
                                                                        "keep_alive": "soon"}}, 400, "keep_alive"))
        cases.append((f"{path} keep_alive bool", "POST", path, {"json": {"model": MODEL, "prompt": "hi",
                                                                         "messages": [], "keep_alive": True}}, 400,
                      "keep_alive"))
        hi = [{"role": "user", "content": "hi"}]
        cases.append((f"{path} format yaml", "POST", path, {"json": {"model": MODEL, "prompt": "hi", "messages": hi,
                                                                     "format": "yaml"}}, 400, "format"))
        cases.append((f"{path} format int", "POST", path, {"json": {"model": MODEL, "prompt": "hi", "messages": hi,
                                                                    "format": 5}}, 400, "format"))
        cases.append((f"{path} format bad schema", "POST", path,
                      {"json": {"model": MODEL, "prompt": "hi", "messages": hi, "format": {"type": "foo"}}}, 400,
                      "invalid type: foo"))
        cases.append((f"{path} format unsatisfiable", "POST", path,
                      {"json": {"model": MODEL, "prompt": "hi", "messages": hi,
                                "format": {"type": "integer", "minimum": 5, "maximum": 2}}}, 400, "unsatisfiable"))
        cases.append((f"{path} GET", "GET", path, {}, 405, "not allowed"))

    # images: bad base64, wrong kinds of data, limits
    bad_images = [
        (["@@@not base64@@@"], "base64"), (["abc"], "too short"), ([""], "empty"), ([5], "images"),
        ([b64(TEXT_FILE)], "not an image"), ([b64(TRUNCATED)], "truncated or corrupt"),
        ([b64(ONE_PIXEL)], "smaller than the minimum"), ([b64(BOMB)], "over the limit"),
        ([b64(GIF_HEADER_ONLY)], "gif"), (["data:text/plain;base64," + b64(PNG)], "media type"),
        (["data:image/png," + b64(PNG)], "base64"), (["data:image/png;base64,@@@"], "base64"),
        ([b64(PNG)] * 5, "too many images"), ([b64(b"%PDF-1.4 fake document body")], "not an image"),
        ([b64(b"\x00" * 64)], "not an image"), ("notalist", "images"),
    ]
    for images, needle in bad_images:
        both({"images": images}, {"_msg": {"images": images}}, 400, needle, f"images {str(images)[:30]}")

    # sampling options out of range or of the wrong type
    bad_options = [
        ({"temperature": -1}, "temperature"), ({"temperature": 101}, "temperature"),
        ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"min_p": 2}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"), ({"repeat_penalty": -1}, "repeat_penalty"),
        ({"num_predict": 0}, "num_predict"), ({"num_predict": -5}, "num_predict"),
        ({"num_predict": "many"}, "num_predict"), ({"seed": "abc"}, "seed"), ({"seed": 1.5}, "seed"),
        ({"stop": 5}, "stop"), ({"stop": [1, 2]}, "stop"), ({"stop": ["x"] * 17}, "stop"),
        ({"num_ctx": -1}, "num_ctx"), ({"temperature": None, "top_p": "x"}, "top_p"),
    ]
    for options, needle in bad_options:
        both({"options": options}, {"options": options}, 400, needle, f"options {options}")

    # prompts and messages
    long_text = "word " * 3000
    both({"prompt": long_text}, {"_msg": {"content": long_text}}, 400, "context holds", "too long")
    both({"prompt": "<image> and <image>"}, {"_msg": {"content": "<image> here"}}, 400, "placeholder",
         "placeholder mismatch")
    both({"raw": True}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "not supported",
         "raw / tools")
    both({"template": "{{ x }}"}, {"_msg": {"role": "wizard"}}, 400, "", "template / bad role")
    both({"prompt": 5}, {"_msg": {"content": 5}}, 400, "", "non-string prompt")
    both({"system": ["a"]}, {"_msg": {"content": {"a": 1}}}, 400, "", "wrong types")
    both({"suffix": "end"}, {"_msg": {"role": 7}}, 400, "", "suffix / role type")
    cases.append(("chat messages not list", "POST", chat, {"json": {"model": MODEL, "messages": "hi"}}, 400,
                  "messages"))
    cases.append(("chat message not object", "POST", chat, {"json": {"model": MODEL, "messages": ["hi"]}}, 400,
                  "messages"))
    cases.append(("chat no role", "POST", chat, {"json": {"model": MODEL, "messages": [{"content": "x"}]}}, 400,
                  "role"))
    cases.append(("show unknown", "POST", "/api/show", {"json": {"model": "ghost"}}, 404, "not found"))
    cases.append(("show no model", "POST", "/api/show", {"json": {}}, 400, "model"))
    cases.append(("show bad json", "POST", "/api/show", {"content": b"{"}, 400, "json"))
    cases.append(("unknown api route", "POST", "/api/pull", {"json": {"model": "x"}}, 404, "no such endpoint"))
    cases.append(("unknown route", "GET", "/api/nothing", {}, 404, "no such endpoint"))
    cases.append(("tags POST", "POST", "/api/tags", {}, 405, "not allowed"))
    return cases


def openai_cases(image_root):
    path = "/v1/chat/completions"
    cases = []

    def body(**kw):
        b = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        b.update(kw)
        return {"json": b}

    def with_image(url, **kw):
        part = {"type": "image_url", "image_url": url if isinstance(url, (str, int)) and kw.pop("bare", False)
                else {"url": url, **kw}}
        return {"json": {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                                   part]}]}}

    for raw, needle in ((b"{bad", "not valid json"), (b"", "body is missing"), (b"[]", "json object"),
                        (b"{\"model\": 1", "not valid json"), (b"null", "json object"), (b"7", "json object")):
        cases.append((f"oa raw {raw!r}", "POST", path, {"content": raw}, 400, needle))
    plain = [
        ({"model": None}, 400, "model"), ({"model": 3}, 400, "model"), ({"model": "gpt-4o"}, 404, "not found"),
        ({"messages": []}, 400, "non-empty"), ({"messages": "hi"}, 400, "messages"), ({"messages": None}, 400,
                                                                                        "messages"),
        ({"messages": ["hi"]}, 400, "messages[0]"), ({"messages": [{"role": "user"}]}, 400, "content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": [{"content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": [5]}]}, 400, "content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "type"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "text"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, 400, "text"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context holds"),
        ({"messages": [{"role": "user", "content": "<image>"}]}, 400, "placeholder"),
        ({"temperature": 3}, 400, "temperature"), ({"temperature": -0.1}, 400, "temperature"),
        ({"temperature": "warm"}, 400, "temperature"), ({"top_p": 0}, 400, "top_p"), ({"top_p": 1.01}, 400, "top_p"),
        ({"max_tokens": 0}, 400, "max_tokens"), ({"max_tokens": -1}, 400, "max_tokens"),
        ({"max_tokens": 1.5}, 400, "max_tokens"), ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"seed": "x"}, 400, "seed"), ({"seed": 1.5}, 400, "seed"), ({"stop": 5}, 400, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"), ({"stop": [1]}, 400, "stop"),
        ({"n": 2}, 400, "n must be 1"), ({"n": "2"}, 400, "n"), ({"logprobs": True}, 400, "logprobs"),
        ({"stream": "yes"}, 400, "stream"), ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, 400,
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, 400,
         "invalid type: foo"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, 400,
         "unimplemented"),
        ({"response_format": {"type": "yaml"}}, 400, "response_format"), ({"response_format": "json"}, 400,
                                                                           "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"frequency_penalty": 5}, 400, "frequency_penalty"), ({"presence_penalty": -3}, 400, "presence_penalty"),
    ]
    for extra, status, needle in plain:
        cases.append((f"oa {str(extra)[:50]}", "POST", path, body(**extra), status, needle))

    outside = image_root.parent / "secret.png"
    outside.write_bytes(PNG)
    images = [
        ("data:text/plain;base64," + b64(PNG), "media type"), ("data:image/png;base64,@@@", "base64"),
        ("data:image/png," + b64(PNG), "base64"), ("data:image/png;base64", "','"),
        ("data:image/png;base64," + b64(TEXT_FILE), "not an image"),
        ("data:image/png;base64," + b64(TRUNCATED), "truncated or corrupt"),
        ("data:image/png;base64," + b64(ONE_PIXEL), "smaller than the minimum"),
        ("data:image/png;base64," + b64(BOMB), "over the limit"),
        ("data:image/gif;base64," + b64(GIF_HEADER_ONLY), "gif"),
        ("http://evil.example/cat.png", "not allow-listed"), ("https://example.com/cat.png", "not allow-listed"),
        ("https://127.0.0.1/x.png", "not allow-listed"), ("http://[::1]:80/x.png", "not allow-listed"),
        ("http://169.254.169.254/latest/meta-data", "not allow-listed"), ("ftp://example.com/a.png", "data: uri"),
        ("/etc/passwd", "data: uri"), (b64(PNG), "data: uri"), ("cat.png", "data: uri"), ("", "non-empty"),
        ("file:///etc/passwd", "outside the image root"), (f"file://{outside}", "outside the image root"),
        (f"file://{image_root}/../secret.png", "'..'"), (f"file://{image_root}/sub/../../secret.png", "'..'"),
        (f"file://{image_root}/missing.png", "no such image file"), (f"file://{image_root}/sub", "no such image"),
        (f"file://otherhost{image_root}/red.png", "only local files"), (f"file://{image_root}/red%00.png", "nul"),
        ("javascript:alert(1)", "data: uri"),
    ]
    for url, needle in images:
        cases.append((f"oa image {url[:40]}", "POST", path, with_image(url), 400, needle))
    cases.append(("oa image bare bad", "POST", path, with_image("http://evil.example/a.png", bare=True), 400,
                  "not allow-listed"))
    cases.append(("oa image url int", "POST", path, with_image(5), 400, "url"))
    cases.append(("oa image detail", "POST", path, with_image("data:image/png;base64," + b64(PNG), detail="ultra"),
                  400, "detail"))
    many = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG)}}] * 5
    cases.append(("oa too many images", "POST", path, {"json": {"model": MODEL, "messages": [
        {"role": "user", "content": many}]}}, 400, "too many images"))
    cases.append(("oa models POST", "POST", "/v1/models", {}, 405, "not allowed"))
    cases.append(("oa unknown model get", "GET", "/v1/models/ghost", {}, 404, "not found"))
    cases.append(("oa unknown route", "POST", "/v1/completions", {"json": {}}, 404, "no such endpoint"))
    cases.append(("oa embeddings", "POST", "/v1/embeddings", {"json": {}}, 404, "no such endpoint"))
    return cases


def upload_cases():
    """POST /api/v1/analyze: the form's shape, its parts' types and the images' bytes."""
    path, cases = "/api/v1/analyze", []

    def form(note, status, needle, images=(("a.png", PNG, "image/png"),), **data):
        data = {"prompt": "hi", **data}
        cases.append((f"upload {note}", "POST", path, {"data": {k: v for k, v in data.items() if v is not None},
                                                        "files": [("image", i) for i in images]}, status, needle))

    for name, data, ctype, needle in (
            ("text", TEXT_FILE, "image/png", "not an image"),
            ("truncated", TRUNCATED, "image/png", "truncated or corrupt"),
            ("1 px", ONE_PIXEL, "image/png", "smaller than the minimum"), ("bomb", BOMB, "image/png", "over the limit"),
            ("gif header", GIF_HEADER_ONLY, "image/gif", "gif"), ("pdf", b"%PDF-1.4 fake document", "image/png",
                                                                   "not an image"),
            ("zeros", b"\x00" * 64, "application/octet-stream", "not an image"), ("empty", b"", "image/png", "empty")):
        form(f"image {name}", 400, needle, images=[("x.png", data, ctype)])
    for ctype in ("text/plain", "application/pdf", "image/svg+xml", "video/mp4", "application/json"):
        form(f"type {ctype}", 415, ctype, images=[("x.bin", PNG, ctype)])
    form("too many images", 400, "too many images", images=[("a.png", PNG, "image/png")] * 5)
    form("no prompt", 400, "prompt", prompt=None)
    form("unknown field", 400, "unknown form field 'temperature'", temperature="0")
    for options, needle in (("{bad", "not valid json"), ("[1]", "json object"), ("5", "json object"),
                            ('{"temperature": -1}', "temperature"), ('{"top_p": 0}', "top_p"),
                            ('{"num_predict": 0}', "num_predict"), ('{"stop": 5}', "stop"),
                            ('{"num_ctx": -1}', "num_ctx")):
        form(f"options {options}", 400, needle, options=options)
    for field, value, needle in (("stream", "yes", "stream"), ("think", "very", "think"), ("format", "yaml", "format"),
                                 ("format", "{nope", "format"), ("format", '{"type": "foo"}', "invalid type: foo"),
                                 ("keep_alive", "soon", "keep_alive"), ("model", "llava:13b", "not found")):
        form(f"{field} {value}", 404 if field == "model" else 400, needle, **{field: value})
    form("too long", 400, "context holds", prompt="word " * 3000)
    form("placeholder", 400, "placeholder", prompt="<image> and <image>")
    boundary = "foveal-bad-inputs"
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    whole = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--{boundary}--\r\n').encode()
    for note, content, headers, status, needle in (
            ("no boundary", whole, {"content-type": "multipart/form-data"}, 400, "boundary"),
            ("garbage", b"garbage", multipart, 400, "malformed multipart"),
            ("cut short", whole[:-8], multipart, 400, "ended before"), ("empty", b"", multipart, 400, "ended before"),
            ("no disposition", whole.replace(b"Content-Disposition: form-data; ", b"X-Other: 1; "), multipart, 400,
             "content-disposition"),
            ("json body", b'{"prompt": "hi"}', {"content-type": "application/json"}, 415, "multipart/form-data")):
        cases.append((f"upload {note}", "POST", path, {"content": content, "headers": headers}, status, needle))
    cases.append(("upload GET", "GET", path, {}, 405, "not allowed"))
    return cases


def oversized_cases():
    big = b"{\"model\": \"tiny\", \"prompt\": \"" + b"a" * (MAX_BODY + 10) + b"\"}"
    out = []
    for path in ("/api/generate", "/api/chat", "/v1/chat/completions", "/api/show"):
        out.append((f"{path} oversized", "POST", path, {"content": big, "headers": {"content-type":
                                                                                    "application/json"}}, 413,
                    "over the limit"))

    def chunked():
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536
    for path in ("/api/generate", "/v1/chat/completions"):
        out.append((f"{path} oversized chunked", "POST", path, {"content_factory": chunked}, 413, "over the limit"))
    big_image = ("big.png", PNG + b"\x00" * MAX_BODY, "image/png")
    out.append(("upload oversized", "POST", "/api/v1/analyze",
                {"data": {"prompt": "hi"}, "files": [("image", big_image)]}, 413, "over the limit"))
    boundary = "foveal-oversized"

    def chunked_form():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
               f'Content-Type: image/png\r\n\r\n').encode() + PNG
        yield from chunked()
    out.append(("upload oversized chunked", "POST", "/api/v1/analyze",
                {"content_factory": chunked_form,
                 "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}, 413, "over the limit"))
    return out


def error_text(r: httpx.Response) -> str:
    body = r.json()
    err = body["error"]
    return (err["message"] if isinstance(err, dict) else err).lower()


def test_bad_requests_get_4xx_json_and_server_stays_healthy(vlm, image_root):
    with LiveServer(vlm, image_root=image_root, max_images=4, max_body_bytes=MAX_BODY) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        cases = ollama_cases(image_root) + openai_cases(image_root) + upload_cases() + oversized_cases()
        assert len(cases) >= 150, len(cases)
        process = psutil.Process(os.getpid())
        rss0 = process.memory_info().rss
        failures = []
        for name, method, path, kwargs, status, needle in cases:
            kwargs = dict(kwargs)
            if "content_factory" in kwargs:
                kwargs["content"] = kwargs.pop("content_factory")()
            try:
                r = c.request(method, path, **kwargs)
            except httpx.HTTPError as e:      # the server may close after refusing an upload mid-body
                failures.append(f"{name}: {type(e).__name__}")
                continue
            problem = None
            if r.status_code != status:
                problem = f"status {r.status_code} != {status}: {r.text[:200]}"
            else:
                try:
                    text = error_text(r)
                except (json.JSONDecodeError, KeyError, TypeError):
                    problem = f"not a JSON error body: {r.text[:200]}"
                else:
                    if needle.lower() not in text:
                        problem = f"error {text[:200]!r} does not mention {needle!r}"
                    elif "traceback" in text or " at 0x" in text or 'file "' in text:
                        problem = f"error leaks internals: {text[:200]!r}"
            if problem:
                failures.append(f"{name}: {problem}")
        assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["models"][0]["queued"] == 0
        ok = c.post("/api/generate", json={"model": MODEL, "prompt": "still fine?", "stream": False,
                                           "options": {"num_predict": 2}})
        assert ok.status_code == 200 and ok.json()["done"]
        grown = process.memory_info().rss - rss0
        assert grown < 256 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
        metrics = c.get("/metrics").text
        assert 'foveal_errors_total{kind="image_error"}' in metrics
