"""Chat templates, tokenization and image-placeholder expansion.

Mirrors transformers' utils/chat_template_utils.py (rendering) and models/llava/processing_llava.py
(placeholder expansion), so token ids equal the HF processor's for the same files.

Design decisions:
- Templates render in jinja2's ImmutableSandboxedEnvironment with what HF adds: trim_blocks,
  lstrip_blocks, loopcontrols, a `{% generation %}` tag (tracked, so training can mask
  everything but assistant text), a `tojson` that keeps non-ASCII, `raise_exception`,
  `strftime_now`. Template errors become PromptError; nothing a template does can reach Python.
- Variables as transformers passes them: `messages`, `tools=None`, `documents=None`,
  `add_generation_prompt` and the tokenizer's named special tokens (bos/eos/unk/sep/pad/cls/mask);
  keys whose value is None are dropped from messages and reasoning is aliased, as
  `apply_chat_template` does, so a template renders the same text in both.
- Message content keeps the form the client gave where the template takes it: string content
  stays a string, a message with images becomes typed parts. What a template takes is found by
  rendering probe conversations once per template (strings, text parts, an image part), not by
  reading its source: many text-only templates mention "type" in their tool-call code. A
  template that only reads strings gets images as `<image>` placeholders in front of the text;
  one that only reads parts (llava-hf's) gets parts throughout.
- Template lookup order: chat_template.jinja, chat_template.json, tokenizer_config.json
  (a string, or a list of named templates: "default" is used). A checkpoint without one gets
  LLaVA-1.5's template (the original repo ships none).
- Each image placeholder (the processor's `image_token`, `<image>`) is expanded to as many
  image tokens as the model's config implies, then the whole prompt is tokenized at once: the
  same string HF's processor tokenizes. When the vocabulary has no image token (original
  LLaVA), text chunks are tokenized separately and image slots spliced between them, as
  LLaVA's `tokenizer_image_token` does. Either way the model gets a boolean image mask.
- Videos (`{"type": "video", "video": ...}` parts, or a message's `videos`) are listed among the
  images as `VideoPart`s only for a caller that takes them (`takes_video`); any other caller gets a
  PromptError naming its model. A model with a video placeholder token (Qwen2-VL's
  `<|video_pad|>`) has it expanded like the image one; `PromptInputs.media` gives the order.
- Streaming detokenization keeps two offsets (prefix/read) so each step decodes a short window,
  and holds text back while it ends in an incomplete UTF-8 sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from ..errors import ConfigError, PromptError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_SLOT = -1     # id used for image positions when the vocabulary has no image token

LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and records where it landed."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        text = caller()
        # Private-use sentinels survive rendering; render_chat turns them into character spans.
        return f"\ue000{text}\ue001"


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    # transformers' `dict` global: builds dicts, exposes nothing else of the type
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # transformers' `namespace` global: no underscore-prefixed attributes (a way towards CPython internals)
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[_GenerationTag, jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
_ENV.globals["dict"] = _TemplateDict()
_ENV.globals["namespace"] = _TemplateNamespace
_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def compile_template(source: str) -> jinja2.Template:
    if source not in _TEMPLATE_CACHE:
        try:
            _TEMPLATE_CACHE[source] = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PromptError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None
    return _TEMPLATE_CACHE[source]


@dataclass
class RenderedChat:
    text: str
    generation_spans: list[tuple[int, int]] = field(default_factory=list)   # char spans of {% generation %}


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                documents=None, **extra) -> RenderedChat:
    """extra: more template variables (special tokens, enable_thinking, ...), as apply_chat_template's kwargs."""
    try:
        raw = compile_template(template).render(messages=messages, tools=tools, documents=documents,
                                                add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.SecurityError as e:
        raise PromptError(f"chat template tried something the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"chat template refused the messages: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise PromptError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
    text, spans, start = [], [], None
    length = 0
    for ch in raw:
        if ch == "\ue000":
            start = length
        elif ch == "\ue001":
            spans.append((start, length))
        else:
            text.append(ch)
            length += 1
    return RenderedChat("".join(text), spans)


def find_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    folder = Path(folder)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        try:
            return json.loads((folder / "chat_template.json").read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{folder / 'chat_template.json'} is not valid (needs a chat_template key)") from None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):      # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _token_content(value) -> str | None:
    if isinstance(value, dict):     # AddedToken serialised as a dict
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers` tokenizer plus what tokenizer_config.json says about special tokens."""

    def __init__(self, tok: HFTokenizer, config: dict | None = None):
        self.tok = tok
        self.config = config or {}
        self.special = {k: _token_content(self.config.get(k)) for k in
                        ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                         "mask_token")}
        self.special = {k: v for k, v in self.special.items() if v}

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ConfigError(f"no tokenizer.json in {folder}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:   # the Rust side raises plain Exception subclasses
            raise ConfigError(f"{path} cannot be read as a tokenizer: {e}") from None
        config = {}
        if (folder / "tokenizer_config.json").exists():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{folder / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        return cls(tok, config)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def eos_ids(self) -> set[int]:
        ids = set()
        for name in ("eos_token",):
            if name in self.special and self.token_id(self.special[name]) is not None:
                ids.add(self.token_id(self.special[name]))
        return ids


@dataclass
class PromptInputs:
    input_ids: list[int]          # image positions hold the image token id (or IMAGE_SLOT)
    image_mask: list[bool]
    n_images: int
    text: str                     # the rendered prompt before expansion
    assistant_mask: list[bool] | None = None   # tokens inside {% generation %} (training)
    media: list[str] = field(default_factory=list)   # "image" / "video" per placeholder, in prompt order


@dataclass(frozen=True)
class ContentForms:
    """Which forms of message content a template renders."""
    strings: bool       # "content": "hello"
    text_parts: bool    # "content": [{"type": "text", "text": "hello"}], written as text (not a Python list)
    images: bool        # an {"type": "image"} part draws something


_PROBE_TEXTS = ("foveal-probe-one", "foveal-probe-two", "foveal-probe-three")
_LIST_REPRS = ("{'type':", '{"type":')
_FORMS_CACHE: dict[str, ContentForms] = {}


def _renders(template: str, conversations) -> str | None:
    """The text of the first probe conversation the template renders with all its texts in it."""
    for messages in conversations:
        try:
            out = render_chat(template, messages).text
        except PromptError:
            continue
        if all(t in out for t in _PROBE_TEXTS[:len(messages)]) and not any(r in out for r in _LIST_REPRS):
            return out
    return None


def content_forms(template: str) -> ContentForms:
    """Found by rendering: templates written for strings, for parts, or for both all exist, and their source
    says little (text-only templates test `"type"` in tool-call code; llava-hf's only iterates parts)."""
    if template not in _FORMS_CACHE:
        def conversations(content):
            roles = ("user", "assistant", "user")
            turns = [{"role": r, "content": content(t)} for r, t in zip(roles, _PROBE_TEXTS)]
            return [turns, turns[:1]]   # some templates insist on alternation, others on one user turn

        text = lambda t: [{"type": "text", "text": t}]     # noqa: E731
        strings = _renders(template, conversations(lambda t: t)) is not None
        text_only = _renders(template, conversations(text))
        with_image = _renders(template, conversations(lambda t: [{"type": "image"}] + text(t)))
        forms = ContentForms(strings, text_only is not None,
                             text_only is not None and with_image is not None and with_image != text_only)
        if not (forms.strings or forms.text_parts):     # no probe rendered: keep what clients send, as HF does
            forms = ContentForms(True, True, True)
        _FORMS_CACHE[template] = forms
    return _FORMS_CACHE[template]


@dataclass
class VideoPart:
    """A video of a message, as `normalize_messages` lists it among the images (in prompt order)."""
    video: object                      # a path, bytes, a data: URI or a list of frames
    fps: float | None = None           # frames a second to sample (a file); a list of frames: its own rate
    num_frames: int | None = None      # sample this many frames instead
    max_frames: int | None = None      # sample at most this many


def normalize_messages(messages, template: str, *, takes_video: bool = False,
                       model: str = "this model") -> tuple[list[dict], list]:
    """Messages for the template and the media in prompt order: image sources, and `VideoPart`s where the
    caller takes video (`takes_video`; otherwise a video is a PromptError naming `model`). Content stays as the
    client gave it where the template takes that form (what apply_chat_template would render); images go in
    as parts where the template draws them, else as `<image>` placeholders in front of the text; videos as
    `{"type": "video"}` parts. A message's `images` and `videos` (Ollama style) come before its content."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role', 'content'} objects")
    forms = content_forms(template)
    out, media = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise PromptError(f"message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise PromptError(f"message {i} has role {role!r}; expected system, user, assistant or tool")
        parts = [{"type": "image", "image": img} for img in m.get("images") or []]
        videos = m.get("videos") or []
        if not isinstance(videos, (list, tuple)):
            raise PromptError(f"message {i} 'videos' must be a list of videos")
        parts += [_normalize_part({"type": "video", "video": v}, i, j) for j, v in enumerate(videos)]
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                parts.append(_normalize_part(part, i, j))
        elif content is not None:
            raise PromptError(f"message {i} content must be a string or a list of parts")
        for p in parts:
            if p["type"] == "image":
                media.append(p.pop("image"))
            elif p["type"] == "video":
                if not takes_video:
                    raise PromptError(f"message {i} has a video, but {model} does not take video input "
                                      f"(send frames as images, or use a Qwen2-VL model)")
                media.append(p.pop("video"))
        has_images = any(p["type"] == "image" for p in parts)
        has_videos = any(p["type"] == "video" for p in parts)
        if has_videos and not (forms.images or not forms.strings):
            raise PromptError(f"message {i} has a video, but the chat template draws no media parts")
        # transformers drops None-valued keys (many templates render a literal "None" otherwise)
        message = {k: v for k, v in m.items() if k not in ("content", "images", "videos") and v is not None}
        message["role"] = role
        message.update(_reasoning_aliases(message))
        if content is None and not has_images and not has_videos:
            pass        # no content key, as apply_chat_template leaves it
        elif isinstance(content, str) and not has_images and not has_videos and forms.strings:
            message["content"] = content
        elif (forms.images if has_images or has_videos else forms.text_parts) or not forms.strings:
            message["content"] = parts
        else:   # a template for strings: images become placeholders in front of the text
            message["content"] = "".join(IMAGE_PLACEHOLDER + "\n" if p["type"] == "image" else p["text"]
                                         for p in parts)
        out.append(message)
    return out, media


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _reasoning_aliases(message: dict) -> dict:
    # as transformers' _alias_reasoning_fields: templates read `reasoning_content`, gpt-oss's reads `thinking`
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return {}
    return {"thinking": message.get("thinking", reasoning), "reasoning_content": reasoning}


def _normalize_part(part, i: int, j: int) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or "type" not in part:
        raise PromptError(f"message {i} part {j} must be an object with a 'type'")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise PromptError(f"message {i} part {j} (text) needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind in ("image", "image_url", "input_image"):
        src = part.get("image", part.get("image_url", part.get("url", part.get("path"))))
        if isinstance(src, dict):
            src = src.get("url")
        if src is None:
            raise PromptError(f"message {i} part {j} is an image part without an image")
        return {"type": "image", "image": src}
    if kind in ("video", "video_url"):
        src = part.get("video", part.get("video_url", part.get("url", part.get("path"))))
        if isinstance(src, dict):
            src = src.get("url")
        if src is None:
            raise PromptError(f"message {i} part {j} is a video part without a video")
        options = {}
        for key in ("fps", "num_frames", "max_frames"):
            value = part.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                    (key != "fps" and not isinstance(value, int)):
                raise PromptError(f"message {i} part {j}: video {key} must be a positive "
                                  f"{'number' if key == 'fps' else 'integer'}, got {value!r}")
            options[key] = value
        if "fps" in options and "num_frames" in options:
            raise PromptError(f"message {i} part {j}: sample a video by fps or by num_frames, not both")
        return {"type": "video", "video": VideoPart(src, **options)}
    raise PromptError(f"message {i} part {j} has type {kind!r}; expected text, image or video")


class PromptBuilder:
    """Turns messages into token ids with image (and video) slots, for one model."""

    def __init__(self, tokenizer: Tokenizer, template: str | None, image_token_id: int | None,
                 tokens_per_image: int, image_token: str = IMAGE_PLACEHOLDER, video_token: str | None = None,
                 video_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.template = template or LLAVA_15_TEMPLATE
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.image_token = image_token
        self.video_token, self.video_token_id = video_token, video_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> RenderedChat:
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt,
                           **self.tokenizer.special)

    def build(self, messages, n_images: int, add_generation_prompt: bool = True,
              track_assistant: bool = False, image_tokens: list[int] | None = None,
              video_tokens: list[int] | None = None, image_texts: list[str] | None = None) -> PromptInputs:
        """image_tokens: the token count of each image, in prompt order, where it depends on the image
        (LLaVA-NeXT); by default every image takes tokens_per_image. video_tokens: each video's count (a
        model with a video placeholder token); `PromptInputs.media` then says which slots are which.
        image_texts: what each image placeholder becomes, in prompt order, where that is more than the image
        token repeated (Idefics3's tile markers around each tile's image tokens); image_tokens then gives
        the image tokens each text holds."""
        rendered = self.render(messages, add_generation_prompt)
        text = rendered.text
        n_placeholders = text.count(self.image_token)
        if n_placeholders != n_images:
            raise PromptError(f"the prompt has {n_placeholders} image placeholder(s) ({self.image_token}) "
                              f"but {n_images} image(s) were given")
        videos = list(video_tokens or [])
        n_video_placeholders = text.count(self.video_token) if self.video_token else 0
        if n_video_placeholders != len(videos):
            raise PromptError(f"the prompt has {n_video_placeholders} video placeholder(s) ({self.video_token}) "
                              f"but {len(videos)} video(s) were given")
        if n_images and self.tokens_per_image == 0:
            raise PromptError("this model has no vision tower: it cannot take images")
        counts = [self.tokens_per_image] * n_images if image_tokens is None else list(image_tokens)
        if len(counts) != n_images:
            raise PromptError(f"{len(counts)} image token count(s) for {n_images} image(s)")
        add_special = not (self.tokenizer.special.get("bos_token")
                           and text.startswith(self.tokenizer.special["bos_token"]))
        if self.image_token_id is not None:
            slots = _placeholders(text, self.image_token, self.video_token, iter(counts), iter(videos))
            if image_texts is not None and len(image_texts) != n_images:
                raise PromptError(f"{len(image_texts)} image text(s) for {n_images} image(s)")
            texts = iter(image_texts or ())
            slots = [(start, token, n, next(texts) if image_texts is not None and token == self.image_token
                      else token * n) for start, token, n in slots]
            expanded, at = [], 0
            for start, token, n, replacement in slots:
                expanded += [text[at:start], replacement]
                at = start + len(token)
            enc = self.tokenizer.tok.encode("".join(expanded) + text[at:], add_special_tokens=add_special)
            ids = enc.ids
            slot_ids = {self.image_token_id} | ({self.video_token_id} if videos else set())
            mask = [t in slot_ids for t in ids]
            if sum(mask) != sum(counts) + sum(videos):
                raise PromptError(f"expected {sum(counts) + sum(videos)} image/video tokens after expansion, "
                                  f"found {sum(mask)}: the text itself contains the image or video token")
            assistant = _span_mask(enc.offsets, _shift_spans(rendered.generation_spans, slots)) \
                if track_assistant else None
            media = ["image" if token == self.image_token else "video" for _, token, _, _ in slots]
        else:
            ids, mask, assistant = self._splice(text, add_special, rendered.generation_spans, track_assistant,
                                                counts)
            media = ["image"] * n_images
        return PromptInputs(ids, mask, n_images, text, assistant, media)

    def _splice(self, text, add_special, spans, track, counts):
        ids, mask, assistant, offset = [], [], [], 0
        for k, chunk in enumerate(text.split(self.image_token)):
            if k:
                n = counts[k - 1]
                ids += [IMAGE_SLOT] * n
                mask += [True] * n
                assistant += [False] * n
                offset += len(self.image_token)
            enc = self.tokenizer.tok.encode(chunk, add_special_tokens=add_special and k == 0)
            ids += enc.ids
            mask += [False] * len(enc.ids)
            if track:
                assistant += _span_mask([(a + offset, b + offset) for a, b in enc.offsets], spans)
            offset += len(chunk)
        return ids, mask, (assistant if track else None)


def _placeholders(text, image_token, video_token, image_counts, video_counts) -> list[tuple[int, str, int]]:
    """(position, placeholder, token count) of every image / video placeholder, in text order."""
    found = []
    for token, counts in ((image_token, image_counts), (video_token, video_counts)):
        if not token:
            continue
        at = text.find(token)
        while at != -1:
            found.append((at, token, next(counts)))
            at = text.find(token, at + len(token))
    return sorted(found)


def _shift_spans(spans, slots):
    """Generation spans in the unexpanded text -> spans in the expanded text (a placeholder grows into its
    replacement)."""
    def grow(pos):
        return sum(len(rep) - len(token) for start, token, _, rep in slots if start + len(token) <= pos)
    return [(a + grow(a), b + grow(b)) for a, b in spans]


def _span_mask(offsets, spans) -> list[bool]:
    # a token counts when any of its characters lies in a span (HF marks tokens via char_to_token)
    return [any(s < b and e > a for a, b in spans) for s, e in offsets]


class StreamDecoder:
    """Incremental detokenizer: feed ids one by one, get only complete new text."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
