"""llama.cpp itself (through llama-cpp-python) on foveal's GGUF exports of the bundled model.

Optional: skipped where llama-cpp-python is not installed (CI does not build it; see
../shared/reference/peers.md for the build flags this machine needs).

What is checked: llama.cpp loads the exported text model, tokenizes text exactly as foveal's
tokenizer does, and its greedy tokens equal foveal's on the same prompt ids (F32 and F16 exports;
the export is the file, foveal runs the float32 original); the exported mmproj runs in llama.cpp's
vision code (mtmd) and gives foveal's answers to the README's example questions.
"""

from pathlib import Path

import pytest

import foveal
from foveal.bundled import ASSET_DIR
from foveal.cli import main as cli_main

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="no bundled model installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_QUESTIONS = [line.split("->")[0].strip() for line in (EXAMPLES / "questions.txt").read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
QUESTIONS = ["How many objects are in the image?", "What color is the circle?", "Describe the image.",
             "Is there a red square in the image?", "Read the text in the image.",
             "In which part of the image is the star?"]
TEXTS = ["a medium blue circle at the bottom left and the text J in the middle", "USER: hello ASSISTANT: 3 shapes",
         "Is there a green square in the image?\nAnswer the question using a single word or phrase."]


@pytest.fixture(scope="module")
def ours():
    return foveal.load(None, dtype="float32")


@pytest.fixture(scope="module", params=["f32", "f16"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gguf-{request.param}")
    assert cli_main(["export", str(ASSET_DIR), "--gguf", str(out), "--type", request.param]) == 0
    model = next(p for p in out.glob("*.gguf") if "mmproj" not in p.name)
    mmproj = next(p for p in out.glob("*.gguf") if "mmproj" in p.name)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=2, n_gpu_layers=0, verbose=False)
    yield llm, mmproj
    llm.close()


def test_llama_cpp_tokenizes_like_foveal(ours, exported):
    llm, _ = exported
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours.tokenizer.tok.encode(text).ids, text


def test_llama_cpp_greedy_tokens_equal_foveals(ours, exported):
    llm, _ = exported
    eos = set(ours.engine.eos_ids)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids, _ = ours.prompt_logits(messages)
        mine = ours.generate(messages, max_tokens=24, temperature=0.0).token_ids
        llm.reset()
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in eos or len(theirs) == len(mine):
                break
            theirs.append(token)
        assert theirs == [t for t in mine if t not in eos], question


def foveal_chat_handler():
    """llama-cpp-python's LLaVA handler, with the bundled model's own chat template (no system
    line; "USER: <image>\\nquestion ASSISTANT:") so both engines see the same tokens."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class Handler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = ("{% for message in messages %}{% if message.role == 'user' %}USER: "
                       "{% for content in message.content %}{% if content.type == 'image_url' %}"
                       "{{ content.image_url.url }}\n{% endif %}{% endfor %}"
                       "{% for content in message.content %}{% if content.type == 'text' %}{{ content.text }} "
                       "{% endif %}{% endfor %}{% endif %}{% endfor %}ASSISTANT:")
    return Handler


def test_image_answers_through_llama_cpps_clip_equal_foveals(ours, exported, tmp_path):
    """The exported mmproj runs in llama.cpp's own vision code (mtmd/clip): same answers as foveal."""
    import base64
    llm, mmproj = exported
    chat = llama_cpp.Llama(model_path=llm.model_path, n_ctx=512, n_threads=2, n_gpu_layers=0, verbose=False,
                           chat_handler=foveal_chat_handler()(clip_model_path=str(mmproj), verbose=False))
    image = EXAMPLES / "shapes.png"
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    same = []
    for question in EXAMPLE_QUESTIONS:
        theirs = chat.create_chat_completion(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                          {"type": "text", "text": question}]}],
            temperature=0.0, max_tokens=48)["choices"][0]["message"]["content"]
        mine = ours.generate([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                            {"type": "text", "text": question}]}],
                             max_tokens=48, temperature=0.0).text
        same.append((question, mine.strip(), theirs.strip()))
    chat.close()
    assert all(m == t for _, m, t in same), same
