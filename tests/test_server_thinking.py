"""A model's thought reaches clients in Ollama's `thinking` and OpenAI-style `reasoning_content`, never in the
answer, streamed or not; a thought sent back with an earlier turn goes into the prompt in front of that turn.

The model here is the tiny random one with its engine scripted to write a fixed thought and answer, so
that the split is checked through the real API layer, server and official clients; the bundled model's
own thinking is checked in test_bundled.py."""

from __future__ import annotations

import httpx
import pytest

import foveal
from foveal.bundled import build_random_model
from foveal.engine.generate import Chunk, Stats

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

from live_server import MODEL, LiveServer  # noqa: E402

PIECES = ["<thi", "nk>a red", " circle</th", "ink>", "red"]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    vlm = foveal.load(build_random_model(tmp_path_factory.mktemp("tiny") / MODEL), dtype="float32")
    prompts = []

    def stream(input_ids, image_mask, image_embeds, image_keys, opts, stats, cancel=None, constraint=None):
        for i, piece in enumerate(PIECES):
            yield Chunk(piece, [i])
        stats.generated_tokens = len(PIECES)
        yield Chunk("", [], done=True, finish_reason="stop", stats=stats)

    build = vlm.prompt.build

    def recording_build(messages, *args, **kwargs):
        prompts.append(messages)
        return build(messages, *args, **kwargs)

    vlm.engine.stream = stream
    vlm.prompt.build = recording_build
    with LiveServer(vlm) as server:
        yield server, prompts


def test_python_api_splits_the_thought(scripted):
    server, _ = scripted
    vlm = server.registry.entries[MODEL].vlm
    result = vlm.generate([{"role": "user", "content": "What color is the circle?"}])
    assert (result.thinking, result.text) == ("a red circle", "red")
    chunks = list(vlm.stream([{"role": "user", "content": "What color is the circle?"}]))
    assert "".join(c.text for c in chunks) == "red" and "".join(c.thinking for c in chunks) == "a red circle"


def test_ollama_chat_and_generate_thinking(scripted):
    server, prompts = scripted
    client = ollama.Client(host=server.url)
    msgs = [{"role": "user", "content": "What color is the circle?"}]
    r = client.chat(model=MODEL, messages=msgs, think=True)
    assert (r.message.content, r.message.thinking) == ("red", "a red circle")
    hidden = client.chat(model=MODEL, messages=msgs, think=False)
    assert hidden.message.content == "red" and not hidden.message.thinking
    default = client.chat(model=MODEL, messages=msgs)
    assert (default.message.content, default.message.thinking) == ("red", "a red circle")
    parts = list(client.chat(model=MODEL, messages=msgs, think=True, stream=True))
    assert "".join(p.message.content for p in parts) == "red"
    assert "".join(p.message.thinking or "" for p in parts) == "a red circle"
    assert parts[-1].done and parts[-1].eval_count == len(PIECES)
    quiet = list(client.chat(model=MODEL, messages=msgs, think=False, stream=True))
    assert "".join(p.message.content for p in quiet) == "red" and not any(p.message.thinking for p in quiet)
    g = client.generate(model=MODEL, prompt="What color is the circle?", think=True)
    assert (g.response, g.thinking) == ("red", "a red circle")
    # the earlier turn's thought, sent back, is in front of its answer in the prompt
    client.chat(model=MODEL, messages=msgs + [{"role": "assistant", "content": "red", "thinking": "a red circle"},
                                              {"role": "user", "content": "And its shape?"}])
    assert prompts[-1][1]["content"] in ("<think>a red circle</think>red",
                                         [{"type": "text", "text": "<think>a red circle</think>red"}])


def test_ollama_refuses_an_unknown_think_level(scripted):
    server, _ = scripted
    r = httpx.post(server.url + "/api/chat", json={"model": MODEL, "think": "maximum",
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "think must be true, false or one of low, medium, high" in r.json()["error"]
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL, "prompt": "hi", "think": "high",
                                                       "stream": False})
    assert r.status_code == 200 and r.json()["thinking"] == "a red circle"


def test_openai_reasoning_content(scripted):
    server, prompts = scripted
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "What color is the circle?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs)
    assert r.choices[0].message.content == "red"
    assert r.choices[0].message.model_extra["reasoning_content"] == "a red circle"
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "red"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "a red circle"
    client.chat.completions.create(model=MODEL, messages=msgs + [
        {"role": "assistant", "content": "red", "reasoning_content": "a red circle"},
        {"role": "user", "content": "And its shape?"}])
    assert prompts[-1][1]["content"] in ("<think>a red circle</think>red",
                                         [{"type": "text", "text": "<think>a red circle</think>red"}])
    client.chat.completions.create(model=MODEL, messages=msgs + [
        {"role": "assistant", "content": [{"type": "text", "text": "red"}], "reasoning_content": "a red circle"},
        {"role": "user", "content": "And its shape?"}])
    assert prompts[-1][1]["content"] == [{"type": "text", "text": "<think>a red circle</think>"},
                                         {"type": "text", "text": "red"}]
    bad = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "assistant", "content": "red", "reasoning_content": 3}, {"role": "user", "content": "hi"}]})
    assert bad.status_code == 400 and "messages[0].reasoning_content must be a string" in bad.text


def test_cli_run_and_chat_hide_the_thought_unless_asked_and_chat_keeps_it(scripted, monkeypatch, capsys):
    import io

    from foveal import cli
    server, prompts = scripted
    vlm = server.registry.entries[MODEL].vlm
    monkeypatch.setattr(cli, "_load", lambda args, model: vlm)
    assert cli.main(["run", "What color is the circle?"]) == 0
    out = capsys.readouterr()
    assert out.out == "red\n" and "a red circle" not in out.err
    assert cli.main(["run", "--think", "What color is the circle?"]) == 0
    out = capsys.readouterr()
    assert out.out == "red\n" and "Thinking...\na red circle\n...done thinking." in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("What color is the circle?\nAnd its shape?\n"))
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == "red\nred\n"
    second = prompts[-1]
    assert second[1]["role"] == "assistant"
    assert second[1]["content"] in ("<think>a red circle</think>red",
                                    [{"type": "text", "text": "<think>a red circle</think>red"}])
