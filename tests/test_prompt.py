"""Chat templates rendered as HF renders them; placeholders, context limits, token ids."""

import json

import pytest
from PIL import Image

import foveal
import tiny
from foveal.errors import ContextLengthError, PromptError
from foveal.processing.prompt import (IMAGE_SLOT, PromptBuilder, Tokenizer, find_chat_template, normalize_messages,
                                      render_chat)

MSGS = [{"role": "user", "content": [{"type": "text", "text": "héllo"}]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_llava(tmp_path_factory.mktemp("prompt"))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return foveal.load(model_dir, dtype="float32")


def test_generation_tag_marks_assistant_text():
    t = "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}" \
        "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}"
    out = render_chat(t, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert out.text == "user: hi\nassistant: yo\n"
    (a, b), = out.generation_spans
    assert out.text[a:b] == "yo"


def test_loopcontrols_tojson_strftime_and_trim_blocks():
    t = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.content | tojson }}"
         "{% endfor %}|{{ strftime_now('%Y') | length }}")
    out = render_chat(t, [{"role": "user", "content": "é"}, {"role": "user", "content": "x"}])
    assert out.text == '"é"|4'          # tojson keeps non-ASCII; trim_blocks ate the newline


def test_raise_exception_becomes_prompt_error():
    t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    with pytest.raises(PromptError, match="must start with user"):
        render_chat(t, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = [].append.__self__ %}{{ cycler.__init__.__globals__.os.system('true') }}",
])
def test_sandbox_blocks_escapes(template):
    with pytest.raises(PromptError):
        render_chat(template, MSGS)


def test_syntax_error_is_prompt_error():
    with pytest.raises(PromptError, match="syntax error"):
        render_chat("{% for %}", MSGS)


def test_template_lookup_order(tmp_path):
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert find_chat_template(tmp_path, {"chat_template": "config"}) == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert find_chat_template(tmp_path, {"chat_template": "config"}) == "jinja"
    other = tmp_path / "other"
    other.mkdir()
    assert find_chat_template(other, {"chat_template": "config"}) == "config"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    assert find_chat_template(other, {"chat_template": named}) == "dflt"
    assert find_chat_template(other, {}) is None


def test_multi_turn_ids_equal_hf_processor(model_dir, vlm):
    processor = tiny.hf_processor(model_dir)
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A green box."}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure? 🙂 日本語"}]}]
    ref = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids, _ = vlm.prompt_logits(conv)
    assert ids == list(ref["input_ids"][0] if hasattr(ref["input_ids"][0], "__len__") else ref["input_ids"])


def test_more_placeholders_than_images(vlm):
    msgs = [{"role": "user", "content": "<image>\nWhat is this?"}]
    with pytest.raises(PromptError, match=r"1 image placeholder\(s\).*0 image\(s\)"):
        vlm.generate(msgs, max_tokens=2)


def test_more_images_than_placeholders(model_dir, vlm):
    builder = PromptBuilder(vlm.tokenizer, "{% for m in messages %}{{ m.content[-1].text }}{% endfor %}",
                            vlm.config.image_token_id, vlm.image_tokens_per_image)
    msgs, images = normalize_messages([foveal.user("hi", images=[Image.new("RGB", (9, 9))])], builder.template)
    with pytest.raises(PromptError, match=r"0 image placeholder\(s\).*1 image\(s\)"):
        builder.build(msgs, len(images))


def test_prompt_longer_than_context_names_both_counts(model_dir):
    small = foveal.load(model_dir, dtype="float32", context_length=32)
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ContextLengthError) as e:
        small.generate([foveal.user("describe " * 10, images=[img])], max_tokens=4)
    assert e.value.available == 32 and e.value.needed > 32
    assert f"{e.value.needed} tokens" in str(e.value) and "32" in str(e.value)


def test_bad_messages_are_prompt_errors(vlm):
    for bad in ([], [{"content": "no role"}], [{"role": "robot", "content": "x"}],
                [{"role": "user", "content": 42}], [{"role": "user", "content": [{"type": "video"}]}],
                [{"role": "user", "content": [{"type": "image"}]}]):
        with pytest.raises(PromptError):
            vlm.generate(bad, max_tokens=1)


def test_original_layout_splices_image_slots(model_dir):
    """Without an image token in the vocabulary, chunks are tokenized apart and slots spliced in."""
    tok = Tokenizer.from_folder(model_dir)
    builder = PromptBuilder(tok, None, None, tokens_per_image=3)
    msgs, images = normalize_messages([foveal.user("What?", images=["x.png"])], builder.template)
    out = builder.build(msgs, len(images))
    text = out.text
    before, after = text.split("<image>")
    assert out.input_ids == tok.encode(before) + [IMAGE_SLOT] * 3 + tok.encode(after, add_special_tokens=False)
    assert out.image_mask.count(True) == 3


def test_assistant_mask_covers_only_assistant_text(vlm):
    conv = [{"role": "user", "content": [{"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The answer"}]}]
    msgs, _ = normalize_messages(conv, vlm.prompt.template)
    out = vlm.prompt.build(msgs, 0, add_generation_prompt=False, track_assistant=True)
    masked = [t for t, m in zip(out.input_ids, out.assistant_mask) if m]
    assert vlm.tokenizer.decode(masked).strip() == "The answer"
