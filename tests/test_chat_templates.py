"""Real models' chat templates: foveal's prompt text equals transformers' for the same messages.

The templates are llama.cpp's test set (tests/data/templates/README.md), plus the llava-hf and
Qwen2-VL-style templates of the tiny test checkpoints. The reference is transformers'
`apply_chat_template(..., tokenize=False, add_generation_prompt=True)` on a tokenizer with the same
special tokens; a conversation transformers itself cannot render with a template is skipped for it.

Messages as clients send them: string content, and images either as an Ollama-style `images` list
or as parts (`foveal.user`). transformers gets string content as strings and a message with images
as parts, as its processors expect; a template that drops string content (llava-hf's iterates the
parts) is one transformers' processors always feed parts, so its reference gets parts throughout.
"""

from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

import foveal
import tiny
from foveal.errors import PromptError
from foveal.processing.prompt import LLAVA_15_TEMPLATE, PromptBuilder, Tokenizer, normalize_messages

transformers = pytest.importorskip("transformers")

TEMPLATES = {p.stem: p.read_text() for p in sorted((Path(__file__).parent / "data" / "templates").glob("*.jinja"))}
TEMPLATES["tiny-llava-hf"] = tiny.LLAVA_TEMPLATE
TEMPLATES["tiny-qwen2-vl"] = tiny.QWEN_TEMPLATE
TEMPLATES["foveal-llava-1.5-default"] = LLAVA_15_TEMPLATE

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

TEXT_CASES = {
    "user": [{"role": "user", "content": "hello"}],
    "system-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}],
    "multi-turn": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What is 2+2?"}],
    "system-multi-turn": [{"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Bonjour !"},
                          {"role": "user", "content": "Ça va ?"}],
}
IMAGE_CASES = {
    "image": [{"role": "user", "content": "What is in the picture?", "images": ["cat.png"]}],
    "image-multi-turn": [foveal.user("Describe this.", images=["cat.png"]),
                         {"role": "assistant", "content": "A red square."},
                         {"role": "user", "content": "And its border?"}],
}


def _hf_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIAL.values())}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL), backend


HF_TOK, BACKEND = _hf_tokenizer()


def _hf_render(template, messages):
    return HF_TOK.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _as_parts(message):
    """The message as transformers' processors are given it: content as typed parts."""
    content = message.get("content")
    parts = [{"type": "image"} for _ in message.get("images", ())]
    if isinstance(content, str):
        parts.append({"type": "text", "text": content})
    else:
        parts += [{"type": p["type"]} if p["type"] == "image" else dict(p) for p in content]
    return {k: v for k, v in message.items() if k not in ("content", "images")} | {"content": parts}


def _texts(messages):
    for m in messages:
        c = m["content"]
        yield from ([c] if isinstance(c, str) else [p["text"] for p in c if p["type"] == "text"])


def _reference(template, messages):
    mixed = [_as_parts(m) if m.get("images") or not isinstance(m["content"], str) else m for m in messages]
    try:
        text = _hf_render(template, mixed)
        if all(t in text for t in _texts(messages)):
            return text
    except Exception:   # transformers refuses these messages with this template: try its processors' form
        pass
    try:
        return _hf_render(template, [_as_parts(m) for m in messages])
    except Exception as e:
        pytest.skip(f"transformers cannot render this conversation with this template: {type(e).__name__}: {e}")


def _takes_images(template):
    """Whether transformers' rendering of an image part differs from text alone (the template draws images)."""
    try:
        with_image = _hf_render(template, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}])
        text_only = _hf_render(template, [{"role": "user", "content": [{"type": "text", "text": "q"}]}])
    except Exception:
        return False
    return with_image != text_only and not any(r in with_image for r in ("{'type':", '{"type":'))   # not a dump


IMAGE_TEMPLATES = sorted(name for name, t in TEMPLATES.items() if _takes_images(t))
CASES = [(n, c) for n in TEMPLATES for c in TEXT_CASES] + [(n, c) for n in IMAGE_TEMPLATES for c in IMAGE_CASES]


def foveal_prompt(template, messages):
    builder = PromptBuilder(Tokenizer(BACKEND, dict(SPECIAL)), template, None, tokens_per_image=1)
    template_messages, images = normalize_messages(messages, builder.template)
    return builder.render(template_messages).text, images


def test_the_image_templates_are_found():
    for name in ("google-gemma-4-31B-it", "Qwen3.5-4B", "tiny-llava-hf", "tiny-qwen2-vl", "Mistral-Small-3.2-24B-Instruct-2506"):
        assert name in IMAGE_TEMPLATES


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}:{c}" for n, c in CASES])
def test_prompt_text_equals_transformers(name, case):
    template = TEMPLATES[name]
    messages = (TEXT_CASES | IMAGE_CASES)[case]
    expected = _reference(template, messages)
    try:
        text, images = foveal_prompt(template, messages)
    except PromptError as e:
        pytest.fail(f"foveal refused what transformers renders: {e}")
    assert text == expected
    assert images == ["cat.png"] * (case in IMAGE_CASES)


def test_standard_variables_are_defined_as_in_transformers():
    """transformers always passes tools=None and documents=None: `tools is none` holds, `tools is defined` too."""
    t = "{{ tools is defined }} {{ tools is none }} {{ documents is none }} {{ bos_token }}{{ eos_token }}"
    assert foveal_prompt(t, [{"role": "user", "content": "x"}])[0] == _hf_render(t, [{"role": "user", "content": "x"}])
