"""POST /api/v1/analyze (multipart/form-data uploads) on the real server on loopback: the answer is
/api/generate's for the same prompt and images, and every limit (part types, file sizes, image
count, pixel count, form shape) answers a 4xx JSON error naming the problem while the server stays
healthy. Random weights write gibberish, so answers are compared with /api/generate's, never read."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import pytest
from PIL import Image

import foveal
from foveal.processing import images as image_decoder
from foveal.processing.images import ImageLimits
from foveal.server import Metrics, ModelRegistry, ServerConfig, create_app
from foveal.server.upload import IMAGE_TYPES

from test_server import (IMAGE_TOKENS, MODEL, LiveServer, b64, bomb_png, model_dir, png_bytes,  # noqa: F401
                         vlm)

PATH = "/api/v1/analyze"
PNG = png_bytes()
BLUE = png_bytes(color=(0, 0, 255))
OPTS = {"num_predict": 5, "temperature": 0}
MAX_BODY = 2 * 2**20
MAX_IMAGES = 10
# fields of the final object that are the same for two identical requests (durations and the prefix
# cache's hit count are not)
SAME = ("response", "done", "done_reason", "prompt_eval_count", "eval_count", "image_count", "image_token_count",
        "model")


@pytest.fixture(scope="module")
def server(vlm):
    with LiveServer(vlm, max_images=MAX_IMAGES, max_body_bytes=MAX_BODY) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def upload(http, prompt="Describe the image.", images=(PNG,), options=OPTS, **fields):
    """Through httpx's own multipart encoder: images as ("image", (name, bytes, type)) file parts."""
    data = {k: v for k, v in {"prompt": prompt, **fields}.items() if v is not None}
    if options is not None:
        data["options"] = options if isinstance(options, str) else json.dumps(options)
    files = [("image", img if isinstance(img, tuple) else (f"img{i}.png", img, "image/png"))
             for i, img in enumerate(images)]
    return http.post(PATH, data=data, files=files)


def generate(http, prompt="Describe the image.", images=(PNG,), options=OPTS, **fields):
    body = {"model": MODEL, "prompt": prompt, "options": options, **fields}
    if images:
        body["images"] = [b64(i) for i in images]
    return http.post("/api/generate", json=body)


def multipart(parts, boundary="foveal-test-boundary") -> tuple[bytes, dict]:
    """A multipart/form-data body by hand (httpx sends a form without files url-encoded, and cannot
    write a malformed one). parts: (name, text) or (name, (filename, bytes, content_type))."""
    out = bytearray()
    for name, value in parts:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data, ctype = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            if ctype:
                out += f"Content-Type: {ctype}\r\n".encode()
            out += b"\r\n" + data + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert "traceback" not in body["error"].lower() and " at 0x" not in body["error"]
    return body["error"]


def assert_healthy(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["models"][0]["queued"] == 0, health


def same_answer(a: dict, b: dict) -> None:
    assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
    assert set(a) == set(b)


# ---- answers: those of /api/generate ------------------------------------------------------
def test_one_image_same_answer_as_generate(http):
    r = upload(http, stream="false")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert body["image_count"] == 1 and body["image_token_count"] == IMAGE_TOKENS
    same_answer(body, generate(http, stream=False).json())
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "preprocess_duration",
                "vision_encode_duration"):
        assert isinstance(body[key], int) and body[key] >= 0, key


def test_streaming_by_default_same_chunks_as_generate(http):
    r = upload(http)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert all(r.text.split("\n")[:-1])                     # no blank lines
    ours = [json.loads(x) for x in r.text.splitlines()]
    theirs = [json.loads(x) for x in generate(http).text.splitlines()]
    assert [o["response"] for o in ours] == [o["response"] for o in theirs]
    assert all(not o["done"] and "eval_count" not in o for o in ours[:-1])
    same_answer(ours[-1], theirs[-1])
    assert ours[-1]["image_count"] == 1
    whole = upload(http, stream="false").json()["response"]
    assert "".join(o["response"] for o in ours) == whole


def test_two_images_in_order(http):
    r = upload(http, prompt="Compare them.", images=(PNG, BLUE), stream="false")
    body = r.json()
    assert r.status_code == 200 and body["image_count"] == 2 and body["image_token_count"] == 2 * IMAGE_TOKENS
    same_answer(body, generate(http, prompt="Compare them.", images=(PNG, BLUE), stream=False).json())
    swapped = generate(http, prompt="Compare them.", images=(BLUE, PNG), stream=False).json()
    assert swapped["prompt_eval_count"] == body["prompt_eval_count"]


def test_image_count_limit(http):
    r = upload(http, images=[PNG] * MAX_IMAGES, stream="false")
    assert r.status_code == 200 and r.json()["image_count"] == MAX_IMAGES, r.text
    r = upload(http, images=[PNG] * (MAX_IMAGES + 1), stream="false")
    assert r.status_code == 400 and f"too many images: at most {MAX_IMAGES}" in error_of(r)
    assert_healthy(http)


def test_no_image_is_a_text_only_generate(http):
    content, headers = multipart([("prompt", "Say hi."), ("options", json.dumps(OPTS)), ("stream", "false")])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["image_count"] == 0
    same_answer(r.json(), generate(http, prompt="Say hi.", images=(), stream=False).json())


def test_form_fields_as_in_generate(http):
    """model, system, format, think, keep_alive and options mean what they mean in /api/generate."""
    extra = {"system": "You are terse.", "format": "json", "think": "false", "keep_alive": "5m"}
    r = upload(http, model=MODEL + ":latest", stream="false", **extra)
    assert r.status_code == 200, r.text
    same_answer(r.json(), generate(http, stream=False, system="You are terse.", format="json", think=False,
                                   keep_alive="5m").json())
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = upload(http, stream="false", format=json.dumps(schema), options={"num_predict": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    same_answer(r.json(), generate(http, stream=False, format=schema,
                                   options={"num_predict": 12, "temperature": 0}).json())
    # empty text fields (what a browser sends for an input left blank) count as absent
    r = upload(http, stream="false", system="", format="", keep_alive="", model="")
    assert r.status_code == 200, r.text
    same_answer(r.json(), generate(http, stream=False).json())


def test_octet_stream_and_jpeg_parts_are_sniffed(http):
    """curl sends application/octet-stream for .webp or .bmp files: the bytes decide."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 200, 0)).save(buf, "WEBP")
    webp = buf.getvalue()
    r = upload(http, images=[("leaf.webp", webp, "application/octet-stream"), ("red.png", PNG, "image/png")],
               stream="false")
    assert r.status_code == 200 and r.json()["image_count"] == 2, r.text
    content, headers = multipart([("prompt", "hi"), ("options", json.dumps(OPTS)), ("stream", "false"),
                                  ("image", ("raw", PNG, None))])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 200 and r.json()["image_count"] == 1, r.text


def test_every_decoder_format_has_an_accepted_type():
    Image.init()
    for fmt in image_decoder._ALLOWED_FORMATS:
        assert Image.MIME[fmt] in IMAGE_TYPES, fmt


# ---- refusals -------------------------------------------------------------------------------
def test_wrong_content_types_are_415(http):
    cases = [(("notes.txt", b"hello, this is text", "text/plain"), "text/plain"),
             (("paper.pdf", b"%PDF-1.4 a document" * 4, "application/pdf"), "application/pdf"),
             (("logo.svg", b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "image/svg+xml"), "image/svg+xml"),
             (("p.heic", b"\x00\x00\x00\x18ftypheic" * 4, "image/heic"), "image/heic")]
    for part, ctype in cases:
        r = upload(http, images=[part])
        assert r.status_code == 415, (ctype, r.text)
        message = error_of(r)
        assert ctype in message and part[0] in message and "image/png" in message, message
        assert_healthy(http)


def test_bad_image_bytes_are_400_naming_the_part(http):
    text_png = ("cat.png", b"this is a text file, not a picture at all", "image/png")
    r = upload(http, images=[PNG, text_png])
    assert r.status_code == 400
    message = error_of(r)
    assert "image part 2" in message and "cat.png" in message and "not an image" in message, message
    cases = [(("bomb.png", bomb_png(), "image/png"), "over the limit"),
             (("half.png", PNG[: len(PNG) // 2], "image/png"), "truncated or corrupt"),
             (("dot.png", png_bytes((1, 1)), "image/png"), "smaller than the minimum"),
             (("empty.png", b"", "image/png"), "empty")]
    for part, needle in cases:
        r = upload(http, images=[part])
        assert r.status_code == 400 and needle in error_of(r), (part[0], r.text)
        assert_healthy(http)
    bomb = upload(http, images=[("bomb.png", bomb_png(), "image/png")])
    assert "20000x20000" in error_of(bomb) and "bomb.png" in error_of(bomb)
    # the JSON route answers the same bytes with the same problem
    assert "over the limit" in error_of(generate(http, images=[bomb_png()]))


def test_form_shape_errors(http):
    hi = ("options", json.dumps(OPTS))
    cases = [
        ([("image", ("a.png", PNG, "image/png")), hi], 400, "field 'prompt' is required"),
        ([("prompt", ""), hi], 400, "nothing to answer"),
        ([("prompt", "hi"), ("temperature", "0"), ("imagez", ("a.png", PNG, "image/png"))], 400,
         "unknown form fields 'temperature', 'imagez'"),
        ([("prompt", "hi"), ("prompt", "again")], 400, "field 'prompt' is given twice"),
        ([("prompt", "hi"), ("options", "{bad json")], 400, "field 'options' is not valid json"),
        ([("prompt", "hi"), ("options", "[1, 2]")], 400, "field 'options' must be a json object"),
        ([("prompt", "hi"), ("options", json.dumps({"temperature": -1}))], 400, "temperature"),
        ([("prompt", "hi"), ("options", json.dumps({"num_predict": 0}))], 400, "num_predict"),
        ([("prompt", "hi"), ("stream", "maybe")], 400, "field 'stream' must be true or false"),
        ([("prompt", "hi"), ("think", "very")], 400, "think"),
        ([("prompt", "hi"), ("format", "yaml")], 400, "format"),
        ([("prompt", "hi"), ("format", "{nope")], 400, "field 'format' is not valid json"),
        ([("prompt", "hi"), ("keep_alive", "soon")], 400, "keep_alive"),
        ([("prompt", "hi"), ("model", "llava:13b")], 404, "not found"),
    ]
    for parts, status, needle in cases:
        content, headers = multipart(parts)
        r = http.post(PATH, content=content, headers=headers)
        assert r.status_code == status, (parts, r.text)
        assert needle in error_of(r).lower(), (needle, r.text)
        assert_healthy(http)
    content, headers = multipart([("prompt", "x")])
    r = http.post(PATH, content=content.replace(b"\r\n\r\nx", b"\r\n\r\n\xff\xfe"), headers=headers)
    assert r.status_code == 400 and "utf-8" in error_of(r).lower()


def test_blank_browser_inputs_count_as_absent(http):
    """A form's file input left blank sends an empty part with filename=""; its text inputs send ""."""
    content, headers = multipart([("prompt", "Say hi."), ("image", ("", b"", "application/octet-stream")),
                                  ("model", ""), ("system", ""), ("options", json.dumps(OPTS)), ("stream", "false")])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 200 and r.json()["image_count"] == 0, r.text
    blank = ("image", ("", b"", "application/octet-stream"))
    content, headers = multipart([("prompt", "hi"), *[("image", ("a.png", PNG, "image/png"))] * MAX_IMAGES, blank,
                                  ("options", json.dumps(OPTS)), ("stream", "false")])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 200 and r.json()["image_count"] == MAX_IMAGES, r.text
    content, headers = multipart([("prompt", "hi"), *[("image", ("a.png", PNG, "image/png"))] * MAX_IMAGES,
                                  ("image", ("", PNG, "application/octet-stream"))])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 400 and "too many images" in error_of(r)
    content, headers = multipart([("prompt", "hi"), ("image", ("blank.png", b"", "image/png"))])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 400 and "'blank.png') is empty" in error_of(r)


def test_part_count_is_bounded(http):
    content, headers = multipart([("prompt", "hi")] + [(f"x{i}", "") for i in range(5000)])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 400 and "too many parts in the form" in error_of(r)
    content, headers = multipart([("prompt", "hi")] + [("image", ("", b"", None))] * 5000)
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 400 and "too many parts in the form" in error_of(r)
    content, headers = multipart([("prompt", "hi")] + [(f"x{i}", "") for i in range(12)])
    r = http.post(PATH, content=content, headers=headers)
    assert r.status_code == 400 and "'x0', 'x1'" in error_of(r) and "'x9'" in error_of(r)
    assert_healthy(http)


def test_malformed_multipart_is_400(http):
    good, headers = multipart([("prompt", "hi"), ("image", ("a.png", PNG, "image/png"))])
    cases = [
        (good, {"content-type": "multipart/form-data"}, 400, "boundary"),
        (good, {"content-type": "multipart/form-data; boundary=" + "x" * 200}, 400, "multipart"),
        (b"no boundary anywhere in here", headers, 400, "multipart"),
        (good[: len(good) // 2], headers, 400, "ended before"),
        (b"", headers, 400, "ended before"),
        (good.replace(b"Content-Disposition: form-data; ", b"Content-Disposition: attachment; ", 1), headers, 400,
         "content-disposition"),
        (good.replace(b'; name="prompt"', b"", 1), headers, 400, "no name"),
        (good.replace(b"Content-Disposition", b"Content-Disp osition", 1), headers, 400, "multipart"),
        (good.replace(b"Content-Type: image/png", b"Content-Transfer-Encoding: base64", 1), headers, 400,
         "content-transfer-encoding"),
        (good, {"content-type": "multipart/mixed; boundary=foveal-test-boundary"}, 415, "multipart/form-data"),
        (json.dumps({"prompt": "hi"}).encode(), {"content-type": "application/json"}, 415, "multipart/form-data"),
        (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, "multipart/form-data"),
    ]
    for content, hdrs, status, needle in cases:
        r = http.post(PATH, content=content, headers=hdrs)
        assert r.status_code == status, (needle, r.text)
        assert needle in error_of(r).lower(), (needle, r.text)
        assert_healthy(http)
    assert http.get(PATH).status_code == 405


def test_oversized_uploads_are_413(http):
    big = ("big.png", PNG + b"\x00" * MAX_BODY, "image/png")
    r = upload(http, images=[big])                              # Content-Length over the body limit
    assert r.status_code == 413 and "over the limit" in error_of(r)
    content, headers = multipart([("prompt", "hi"), ("image", big)])

    def chunked():                                              # no Content-Length: counted as it arrives
        for i in range(0, len(content), 65536):
            yield content[i:i + 65536]
    r = http.post(PATH, content=chunked(), headers=headers)
    assert r.status_code == 413 and "over the limit" in error_of(r)
    assert_healthy(http)


def test_per_file_limit_is_the_models_image_limit(model_dir):
    small = foveal.load(model_dir, dtype="float32", image_limits=ImageLimits(max_bytes=100_000))
    with LiveServer(small, max_body_bytes=MAX_BODY) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = upload(c, images=[PNG, ("wide.png", PNG + b"\x00" * 150_000, "image/png")])
        assert r.status_code == 413
        message = error_of(r)
        assert "image part 2" in message and "wide.png" in message and "100000 bytes" in message, message
        assert upload(c, stream="false").status_code == 200
        assert_healthy(c)


def test_a_too_large_file_is_refused_while_it_streams_in(model_dir):
    """The refusal comes at the chunk that crosses the per-file limit: the server never asks for the rest."""
    small = foveal.load(model_dir, dtype="float32", image_limits=ImageLimits(max_bytes=1 << 20))
    config = ServerConfig(max_body_bytes=1 << 30)
    registry = ModelRegistry(config, Metrics())
    registry.add_loaded(small, MODEL)
    app = create_app(config, registry)
    head, headers = multipart([("prompt", "hi"), ("image", ("huge.png", b"", "image/png"))])
    head = head[: head.index(b"\r\n\r\n", head.index(b"huge.png")) + 4] + PNG
    sent = [0]

    async def body():
        yield head
        for _ in range(512):                                    # 512 MiB offered
            sent[0] += 1 << 20
            yield b"\x00" * (1 << 20)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.post(PATH, content=body(), headers=headers)
    r = asyncio.run(go())
    assert r.status_code == 413 and "huge.png" in error_of(r)
    assert sent[0] <= 3 << 20, f"the server read {sent[0] >> 20} MiB before refusing"


def test_api_key_applies(vlm):
    with LiveServer(vlm, api_key="s3cret") as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = upload(c, stream="false")
        assert r.status_code == 401 and "API key" in error_of(r)
        r = c.post(PATH, headers={"Authorization": "Bearer wrong"}, files=[("image", ("a.png", PNG, "image/png"))],
                   data={"prompt": "hi"})
        assert r.status_code == 401
        c.headers["Authorization"] = "Bearer s3cret"
        r = upload(c, stream="false")
        assert r.status_code == 200 and r.json()["image_count"] == 1
        r = c.get("/api/tags", headers={"Host": "evil.example"})
        assert r.status_code == 403
        r = c.post(PATH, headers={"Host": "evil.example"}, data={"prompt": "hi"},
                   files=[("image", ("a.png", PNG, "image/png"))])
        assert r.status_code == 403 and "Host header" in error_of(r)


def test_model_is_required_when_several_are_served(vlm, model_dir, tmp_path):
    (tmp_path / "other").symlink_to(model_dir)
    with LiveServer(vlm) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        s.registry.add_path(tmp_path / "other")         # a second model, not loaded
        r = upload(c, stream="false")
        assert r.status_code == 400 and "field 'model' is required" in error_of(r)
        assert upload(c, model=MODEL, stream="false").status_code == 200


def test_server_is_healthy_and_answers_after_bad_uploads(http):
    bad = [upload(http, images=[("x.txt", b"text" * 10, "text/plain")]),
           upload(http, images=[("x.png", b"text" * 10, "image/png")]),
           http.post(PATH, content=b"garbage", headers={"content-type": "multipart/form-data; boundary=b"})]
    assert all(400 <= r.status_code < 500 for r in bad)
    assert_healthy(http)
    ok = upload(http, stream="false")
    assert ok.status_code == 200 and ok.json()["done"]
    metrics = http.get("/metrics").text
    assert 'route="/api/v1/analyze"' in metrics


def test_openapi_describes_the_form(http):
    op = http.get("/openapi.json").json()["paths"][PATH]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["prompt"]
    assert {"prompt", "image", "model", "options", "stream"} <= set(schema["properties"])


def test_client_gone_mid_upload_is_not_an_error(vlm):
    """A client that disconnects while its form streams in gets nothing back (499 in the metrics), and
    nothing is queued."""
    config = ServerConfig()
    registry = ModelRegistry(config, Metrics())
    registry.add_loaded(vlm, MODEL)
    app = create_app(config, registry)
    head, headers = multipart([("prompt", "hi"), ("image", ("a.png", PNG, "image/png"))])
    messages = [{"type": "http.request", "body": head[:40], "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), *((k.encode(), v.encode()) for k, v in headers.items())],
             "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert registry.entries[MODEL].active == 0
