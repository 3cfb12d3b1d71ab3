"""The HTTP server, end to end: a real uvicorn server on loopback with a tiny random LLaVA, driven by
the official `ollama` and `openai` clients (happy paths) and raw httpx (bad input, security,
concurrency, disconnects). Random weights write gibberish, so tests assert structure, token counts
and determinism, never text."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

import foveal
from foveal.bundled import build_random_model
from foveal.errors import ConfigError
from foveal.server import ServerConfig

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from live_server import MODEL, LiveServer  # noqa: E402,F401 (re-exported for the other server tests)
IMAGE_TOKENS = 64          # random_config: 64 px image, 8 px patches


# ---- fixtures --------------------------------------------------------------------------
def png_bytes(size=(32, 32), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(width=20000, height=20000) -> bytes:
    """A valid small PNG whose header claims width x height pixels."""
    data = bytearray(png_bytes((8, 8)))
    ihdr = bytearray(data[12:29])                   # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("tiny") / MODEL)


@pytest.fixture(scope="module")
def vlm(model_dir):
    return foveal.load(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "red.png").write_bytes(png_bytes())
    (root / "sub").mkdir()
    (root / "sub" / "blue.png").write_bytes(png_bytes(color=(0, 0, 255)))
    return root


@pytest.fixture(scope="module")
def server(vlm, image_root):
    with LiveServer(vlm, image_root=image_root, max_images=4, max_body_bytes=2 * 2**20, max_queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def queued(http) -> int:
    return http.get("/health").json()["models"][0]["queued"]


def wait_idle(http, within_s: float) -> float:
    t0 = time.perf_counter()
    while queued(http) != 0:
        assert time.perf_counter() - t0 < within_s, f"generation still running after {within_s} s"
        time.sleep(0.02)
    return time.perf_counter() - t0


# ---- Ollama API through the official client --------------------------------------------
def test_ollama_client_list_show_ps_version(server, http):
    client = ollama.Client(host=server.url)
    assert [m.model for m in client.list().models] == [MODEL]
    shown = client.show(MODEL)
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["vision.image_tokens_per_image"] == IMAGE_TOKENS
    assert shown.details.family == "llama"
    assert [m.model for m in client.ps().models] == [MODEL]
    assert http.get("/").text == "foveal is running"
    assert http.get("/api/version").json()["version"] == foveal.__version__


def test_ollama_client_generate_deterministic_and_counts(server):
    client = ollama.Client(host=server.url)
    opts = {"num_predict": 8, "temperature": 0}
    a = client.generate(model=MODEL, prompt="Describe the image.", options=opts)
    b = client.generate(model=MODEL, prompt="Describe the image.", options=opts)
    assert a.done and a.response == b.response
    assert a.done_reason in ("stop", "length")
    assert a.eval_count == 8 or a.done_reason == "stop"
    assert a.prompt_eval_count > 3 and a.total_duration > 0 and a.eval_duration > 0
    streamed = list(client.generate(model=MODEL, prompt="Describe the image.", options=opts, stream=True))
    assert all(not c.done for c in streamed[:-1]) and streamed[-1].done
    assert "".join(c.response for c in streamed) == a.response
    assert streamed[-1].eval_count == a.eval_count


def test_ollama_client_chat_with_images(server, image_root):
    client = ollama.Client(host=server.url)
    img = (image_root / "red.png").read_bytes()
    msgs = [{"role": "user", "content": "What is this?", "images": [img]}]
    r = client.chat(model=MODEL, messages=msgs, options={"num_predict": 6, "temperature": 0, "seed": 1})
    assert r.message.role == "assistant" and r.done
    assert r.prompt_eval_count >= IMAGE_TOKENS + 3
    text_only = client.chat(model=MODEL, messages=[{"role": "user", "content": "What is this?"}],
                            options={"num_predict": 6, "temperature": 0})
    assert r.prompt_eval_count - text_only.prompt_eval_count >= IMAGE_TOKENS - 2
    parts = list(client.chat(model=MODEL, messages=msgs, stream=True,
                             options={"num_predict": 6, "temperature": 0, "seed": 1}))
    assert all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].eval_count == r.eval_count


def test_ollama_final_object_fields(http):
    r = http.post("/api/chat", json={"model": MODEL, "stream": False, "options": {"num_predict": 3},
                                     "messages": [{"role": "user", "content": "hi", "images": [b64(png_bytes())]}]})
    body = r.json()
    for key in ("done", "done_reason", "total_duration", "load_duration", "prompt_eval_count",
                "prompt_eval_duration", "eval_count", "eval_duration", "preprocess_duration",
                "vision_encode_duration", "image_count", "image_token_count"):
        assert key in body, key
    assert body["image_count"] == 1 and body["image_token_count"] == IMAGE_TOKENS
    assert isinstance(body["total_duration"], int) and body["created_at"].endswith("Z")
    lines = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "options": {"num_predict": 3,
                                                                                           "seed": 1, "unknown": 1}})
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    objs = [json.loads(x) for x in lines.text.splitlines()]
    assert all(x for x in lines.text.split("\n")[:-1])          # no blank lines
    # (text that ends inside a UTF-8 character is held back, so the final object may be the only one)
    assert all("eval_count" not in o and not o["done"] for o in objs[:-1])
    assert objs[-1]["done"] and objs[-1]["eval_count"] <= 3


def test_ollama_load_unload_keep_alive(server, http):
    client = ollama.Client(host=server.url)
    r = client.generate(model=MODEL, prompt="")
    assert r.done and r.done_reason == "load"
    r = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert client.ps().models == []
    again = client.generate(model=f"{MODEL}:latest", prompt="hi", options={"num_predict": 2})   # reloads
    assert again.load_duration > 0 and again.eval_count <= 2
    assert [m.model for m in client.ps().models] == [MODEL]
    r = client.chat(model=MODEL, messages=[])
    assert r.done_reason == "load" and r.message.role == "assistant"


# ---- OpenAI API through the official client --------------------------------------------
def test_openai_client_models_and_chat(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    uri = "data:image/png;base64," + b64(png_bytes())
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=7, temperature=0)
    assert a.object == "chat.completion" and a.choices[0].message.role == "assistant"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 7 and a.usage.prompt_tokens >= IMAGE_TOKENS
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == a.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == a.choices[0].finish_reason


def test_openai_seeded_sampling_and_stop(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    full = a.choices[0].message.content
    if len(full) > 4:
        stop = full[2:4]
        cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0, top_p=0.9,
                                             seed=7, stop=[stop])
        assert cut.choices[0].message.content == full[:full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_openai_file_url_under_root(http, image_root):
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": f"file://{image_root}/sub/blue.png"}, {"type": "text", "text": "hi"}]}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["timings"]["images"] == 1


# ---- JSON-constrained output (format / response_format) --------------------------------
PERSON_SCHEMA = {"type": "object", "additionalProperties": False,
                 "required": ["name", "age", "colour", "tags"],
                 "properties": {"name": {"type": "string", "maxLength": 10},
                                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                "colour": {"enum": ["red", "green", "blue"]},
                                "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                         "maxItems": 3}}}


def test_ollama_client_format_schema_and_json(server, image_root):
    jsonschema = pytest.importorskip("jsonschema")
    client = ollama.Client(host=server.url)
    img = (image_root / "red.png").read_bytes()
    for seed in range(3):
        r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Who?", "images": [img]}],
                        format=PERSON_SCHEMA, options={"temperature": 1.0, "seed": seed, "num_predict": 500})
        assert r.done_reason == "stop", r.message.content[:200]
        jsonschema.validate(json.loads(r.message.content), PERSON_SCHEMA)
    parts = list(client.generate(model=MODEL, prompt="JSON please", format="json", stream=True,
                                 options={"temperature": 0.7, "seed": 1, "num_predict": 2000}))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert isinstance(json.loads("".join(p.response for p in parts)), dict)
    cut = client.generate(model=MODEL, prompt="JSON please", format=PERSON_SCHEMA, options={"num_predict": 4})
    assert cut.done_reason == "length" and cut.eval_count == 4     # incomplete JSON, as Ollama does


def test_openai_client_response_format(server):
    jsonschema = pytest.importorskip("jsonschema")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Who?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, seed=seed,
                                           max_tokens=500)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON_SCHEMA)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, seed=7,
                                            max_tokens=500, stream=True)
    chunks = list(stream)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), PERSON_SCHEMA)
    r = client.chat.completions.create(model=MODEL, messages=msgs, response_format={"type": "json_object"},
                                       seed=2, temperature=0.5, max_tokens=2000)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    cut = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"


def test_openai_client_parse_with_pydantic_model(server):
    """The client's structured-output helper sends a strict schema made from a pydantic model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Shape(BaseModel):
        kind: Literal["circle", "square"]
        sides: int = Field(ge=0, le=8)
        filled: bool

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Shape?"}],
                                      response_format=Shape, seed=0, max_tokens=300)
    shape = r.choices[0].message.parsed
    assert isinstance(shape, Shape) and shape.kind in ("circle", "square") and 0 <= shape.sides <= 8


# ---- concurrency, queue, disconnects ---------------------------------------------------
def test_concurrent_clients_match_sequential(server):
    prompts = [f"Question number {i}: what colour?" for i in range(6)]

    def ask(p):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/api/generate", json={"model": MODEL, "prompt": p, "stream": False,
                                              "options": {"num_predict": 10, "temperature": 0}})
            assert r.status_code == 200
            return r.json()["response"]

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential


def test_stream_disconnect_stops_generation(server, http):
    body = {"model": MODEL, "prompt": "go on forever", "options": {"num_predict": -1, "temperature": 0}}
    # precondition: greedy decoding of this prompt does not end by itself soon (no early EOS)
    probe = http.post("/api/generate", json={**body, "stream": False, "options": {"num_predict": 80, "temperature": 0}})
    assert probe.json()["done_reason"] == "length"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/api/generate", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert json.loads(next(lines))["done"] is False
    assert wait_idle(http, 1.0) < 1.0
    body = {"model": MODEL, "stream": True, "temperature": 0, "messages": [{"role": "user", "content": "go on forever"}]}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")
    assert wait_idle(http, 1.0) < 1.0


def test_nonstream_disconnect_stops_generation(server, http):
    body = {"model": MODEL, "prompt": "go on forever", "stream": False, "options": {"num_predict": -1, "temperature": 0}}
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/api/generate", json=body)
    assert wait_idle(http, 1.5) < 1.5


def test_queue_full_answers_503(vlm):
    with LiveServer(vlm, max_queue=1) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        results = []
        with vlm.engine.lock:          # the admitted request waits for the model...
            t = threading.Thread(target=lambda: results.append(c.post("/api/generate", json={
                "model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 1}})))
            t.start()
            deadline = time.time() + 5
            while c.get("/health").json()["models"][0]["queued"] != 1:
                assert time.time() < deadline
                time.sleep(0.01)
            busy = c.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "busy" in busy.json()["error"]
            busy = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
            assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        t.join(10)                     # ...and completes once the model is free
        assert results[0].status_code == 200 and results[0].json()["eval_count"] == 1
        assert c.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False,
                                             "options": {"num_predict": 1}}).status_code == 200


# ---- security defaults -----------------------------------------------------------------
def test_bind_refuses_public_address_without_key():
    assert ServerConfig().host == "127.0.0.1" and ServerConfig().port == 11435
    with pytest.raises(ConfigError, match="api-key"):
        ServerConfig(host="0.0.0.0").check_bind()
    ServerConfig(host="0.0.0.0", api_key="k").check_bind()
    ServerConfig(host="0.0.0.0", insecure=True).check_bind()
    ServerConfig(host="::1").check_bind()
    from foveal.cli import main
    assert main(["serve", "--host", "0.0.0.0", "/nonexistent"]) == 1


def test_api_key_required_except_health(vlm):
    with LiveServer(vlm, api_key="s3cret") as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/").text == "foveal is running"          # as the static web page: no data, no key
        for method, path in (("GET", "/api/tags"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", "/api/chat"), ("POST", "/v1/chat/completions")):
            r = c.request(method, path)
            assert r.status_code == 401 and "API key" in json.dumps(r.json()), path
        assert c.get("/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/tags", headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.get("/api/tags", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [MODEL]
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert ollama.Client(host=s.url, headers={"Authorization": "Bearer s3cret"}).list().models


def test_host_header_and_cors(vlm, http):
    for host in ("evil.example", "attacker.com:11435", "192.168.1.5"):
        r = http.get("/api/tags", headers={"Host": host})
        assert r.status_code == 403 and "Host header" in r.json()["error"]
    for host in ("localhost", "127.0.0.1:1", "[::1]:9", "app.localhost"):
        assert http.get("/api/tags", headers={"Host": host}).status_code == 200
    r = http.get("/api/tags", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with LiveServer(vlm, cors_origins=["http://app.local"]) as s, httpx.Client(base_url=s.url) as c:
        r = c.get("/api/tags", headers={"Origin": "http://app.local"})
        assert r.headers["access-control-allow-origin"] == "http://app.local"
        r = c.get("/api/tags", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_metrics_prometheus_text(http):
    http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    text = http.get("/metrics").text
    for name in ("foveal_requests_total", "foveal_errors_total", "foveal_queue_depth",
                 "foveal_generated_tokens_total", "foveal_time_to_first_token_seconds_bucket",
                 'foveal_stage_duration_seconds_count{stage="prefill"}'):
        assert name in text, name
    assert "# TYPE foveal_stage_duration_seconds histogram" in text


def test_openapi_schema_served(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/api/chat", "/api/generate", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)
