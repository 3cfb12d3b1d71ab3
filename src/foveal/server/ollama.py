"""Ollama-native API: /api/version, /api/tags, /api/show, /api/ps, /api/generate, /api/chat.

Follows Ollama's docs/api.md and what its official Python client parses: NDJSON streaming by
default, one object with `stream: false`, durations in nanoseconds, `message.role` on every chat
object, `model_info` always present in /api/show. foveal adds per-stage timings to the final
object: `preprocess_duration` (image decode + prompt), `vision_encode_duration` (ns), `image_count`, `image_token_count`,
`prompt_cached_count`. A model's thought (engine/thinking.py) goes to `thinking` / `message.thinking`, never
to the answer; `think: false` leaves it out, and an assistant message's `thinking` is given back to the
model in front of its content. `format` ("json" or a JSON schema) is enforced by constrained decoding
(engine/constrain.py); with done_reason "length" the JSON may be incomplete, as in Ollama.
"""

from __future__ import annotations

import json
import time
from typing import Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from .. import __version__
from ..engine.constrain import schema_of
from ..engine.thinking import with_thought
from ..errors import SamplingError
from .config import parse_duration
from .common import rest_of, rfc3339_now, start_generation, state_of, validate_options
from .errors import APIError, as_api_error, error_line
from .images import decode_base64_image
from .models import WatchedStreamingResponse

router = APIRouter()

# Ollama's Modelfile defaults; num_predict -1 (until the context is full).
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.0}
OPTION_NAMES = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
                # foveal's own (Ollama has no image-token budget): as llama.cpp's --image-min/max-tokens
                "min_image_tokens": "min_image_tokens", "max_image_tokens": "max_image_tokens"}
RENAME_BACK = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
Duration = Union[StrictInt, StrictFloat, StrictStr]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class GenerateRequest(_Body):
    model: StrictStr
    prompt: StrictStr | None = None
    suffix: StrictStr | None = None
    images: list[StrictStr] | None = None
    system: StrictStr | None = None
    template: StrictStr | None = None
    raw: StrictBool | None = None
    format: Union[StrictStr, dict[str, Any], None] = None
    options: dict[str, Any] | None = None
    stream: StrictBool | None = True
    keep_alive: Duration | None = None
    context: list[StrictInt] | None = None
    think: Union[StrictBool, StrictStr, None] = None


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | None = ""
    thinking: StrictStr | None = None
    images: list[StrictStr] | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(_Body):
    model: StrictStr
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    format: Union[StrictStr, dict[str, Any], None] = None
    options: dict[str, Any] | None = None
    stream: StrictBool | None = True
    keep_alive: Duration | None = None
    think: Union[StrictBool, StrictStr, None] = None


class ShowRequest(_Body):
    model: StrictStr | None = None
    name: StrictStr | None = None       # older clients
    verbose: StrictBool | None = None


# ---- helpers ---------------------------------------------------------------------------
def sampling_options(options: dict | None, context_length: int, fmt=None) -> dict:
    if options is None:
        options = {}
    out = dict(DEFAULTS)
    for key, value in options.items():
        if key in OPTION_NAMES:
            out[OPTION_NAMES[key]] = value
        elif key == "num_ctx" and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                         or value < 1):
            raise APIError(400, f"options.num_ctx must be a positive integer, got {value!r}", "sampling_error")
    n = out.get("max_tokens")
    if n is None or (isinstance(n, int) and not isinstance(n, bool) and n in (-1, -2)):
        out["max_tokens"] = context_length
    elif isinstance(n, int) and not isinstance(n, bool) and n < 1:
        raise APIError(400, f"num_predict must be >= 1 (or -1: until the context is full), got {n}",
                       "sampling_error")
    out = {k: v for k, v in out.items() if v is not None}
    validate_options(out, RENAME_BACK)
    if fmt is not None:
        out["format"] = fmt
    return out


def keep_alive_seconds(value) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise APIError(400, str(e), "invalid_request_error", param="keep_alive") from None


def output_format(value):
    """`format`: "json" or a JSON schema object (enforced by constrained decoding), or None."""
    if value in (None, ""):
        return None
    try:
        schema_of(value)
    except SamplingError as e:
        raise APIError(400, str(e), "invalid_request_error", param="format") from None
    return value


THINK_LEVELS = ("low", "medium", "high")


def show_thinking(value) -> bool:
    """`think`: true, "low" / "medium" / "high" (as true) or null return the model's thought in `thinking`;
    false leaves it out. A thought never reaches `response` / `message.content` either way."""
    if value is None or isinstance(value, bool):
        return value is not False
    if value in THINK_LEVELS:
        return True
    raise APIError(400, f"think must be true, false or one of {', '.join(THINK_LEVELS)}, got {value!r}",
                   "invalid_request_error", param="think")


def refuse_unsupported(body, what: str) -> None:
    if what == "generate":
        if body.raw:
            raise APIError(400, "raw prompts are not supported yet: foveal always applies the model's chat "
                                "template", "unsupported", param="raw")
        if body.template:
            raise APIError(400, "a custom template is not supported: foveal uses the model's chat template",
                           "unsupported", param="template")
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by vision models in foveal",
                           "unsupported", param="suffix")
    if what == "chat" and body.tools:
        raise APIError(400, "tools are not supported by foveal yet", "unsupported", param="tools")


def images_of(raw: list | None, where: str, state, counter: list[int]) -> list:
    out = []
    for i, value in enumerate(raw or []):
        counter[0] += 1
        if counter[0] > state.config.max_images:
            raise APIError(400, f"too many images: at most {state.config.max_images} per request",
                           "image_error", param="images")
        out.append(decode_base64_image(value, f"{where}[{i}]", state.config))
    return out


def ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def final_fields(stats, finish_reason: str, load_s: float, t_request: float) -> dict:
    return {
        "done": True,
        "done_reason": finish_reason or "stop",
        "total_duration": ns(time.perf_counter() - t_request),
        "load_duration": ns(load_s),
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": ns(stats.prefill_s),
        "eval_count": stats.generated_tokens,
        "eval_duration": ns(stats.decode_s),
        "preprocess_duration": ns(stats.preprocess_s),
        "vision_encode_duration": ns(stats.encode_s),
        "image_count": stats.images,
        "image_token_count": stats.image_tokens,
        "prompt_cached_count": stats.cached_tokens,
    }


def details(entry) -> dict:
    vlm = entry.vlm
    d = vlm.describe() if vlm is not None else {}
    family = d.get("language_model") or "llava"
    n = sum(vlm.parameter_counts().values()) if vlm is not None else 0
    families = [family] + ([d["vision_family"]] if d.get("vision_family") else [])
    return {"parent_model": "", "format": "safetensors", "family": family, "families": families,
            "parameter_size": _human(n) if n else "", "quantization_level":
                str(vlm.dtype).replace("torch.", "").upper().replace("BFLOAT16", "BF16").replace("FLOAT", "F")
                if vlm is not None else ""}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _size(entry) -> int:
    if entry.vlm is not None:
        return entry.vlm.weight_bytes()
    return sum(p.stat().st_size for p in entry.path.glob("*.safetensors"))


def _digest(entry) -> str:
    import hashlib
    return hashlib.sha256(f"{entry.path.resolve()}:{entry.modified_at}".encode()).hexdigest()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _load_only(st, entry, keep, chat: bool, load_s: float):
    reason = "load"
    if keep is not None and keep == 0:
        await st.registry.unload(entry)
        reason = "unload"
    body = {"model": entry.name, "created_at": rfc3339_now()}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    body.update({"done": True, "done_reason": reason})
    return JSONResponse(body)


async def _respond(request, st, entry, keep, messages, opts, chat: bool, stream: bool, load_s: float,
                   t_request: float, think: bool):
    gen, first = await start_generation(request, entry, messages, opts)

    def piece(text: str, thinking: str) -> dict:
        base = {"model": entry.name, "created_at": rfc3339_now()}
        if chat:
            base["message"] = {"role": "assistant", "content": text}
            if think and thinking:
                base["message"]["thinking"] = thinking
        else:
            base["response"] = text
            if think and thinking:
                base["thinking"] = thinking
        return base

    async def finish_keep_alive():
        if keep is not None and keep == 0:
            await st.registry.unload(entry)

    if not stream:
        chunks = [first] + await gen.collect(request) if first is not None else []
        last = chunks[-1]
        body = piece("".join(c.text for c in chunks), "".join(c.thinking for c in chunks))
        body.update(final_fields(last.stats, last.finish_reason, load_s, t_request))
        await finish_keep_alive()
        return JSONResponse(body)

    async def lines():
        try:
            chunk = first
            later = rest_of(gen, request)
            while chunk is not None:
                if not (chunk.done or chunk.text or (think and chunk.thinking)):
                    chunk = await later.__anext__()     # nothing to send yet (a thought the client did not ask for)
                    continue
                obj = piece(chunk.text, chunk.thinking)
                if chunk.done:
                    obj.update(final_fields(chunk.stats, chunk.finish_reason, load_s, t_request))
                else:
                    obj["done"] = False
                yield (json.dumps(obj) + "\n").encode()
                if chunk.done:
                    break
                chunk = await later.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as e:   # noqa: BLE001 - after the status line: one last error line
            yield error_line(as_api_error(e), openai=False)
        finally:
            gen.cancel.set()
            await finish_keep_alive()

    return WatchedStreamingResponse(lines(), media_type="application/x-ndjson")


# ---- routes ----------------------------------------------------------------------------
@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.get("/api/tags")
async def tags(request: Request):
    st = state_of(request)
    return {"models": [{"name": e.name, "model": e.name, "modified_at": _iso(e.modified_at), "size": _size(e),
                        "digest": _digest(e), "details": details(e)} for e in st.registry.entries.values()]}


@router.get("/api/ps")
async def ps(request: Request):
    st = state_of(request)
    out = []
    for e in st.registry.loaded():
        out.append({"name": e.name, "model": e.name, "size": _size(e), "digest": _digest(e), "details": details(e),
                    "expires_at": _iso(e.expires_at) if e.expires_at is not None else "2318-01-01T00:00:00Z",
                    "size_vram": e.vlm.weight_bytes("cuda"),      # all, none, or the --gpu-layers share
                    "context_length": e.vlm.context_length})
    return {"models": out}


@router.post("/api/show")
async def show(request: Request, body: ShowRequest):
    st = state_of(request)
    entry = st.registry.get(body.model or body.name)
    await st.registry.ensure_loaded(entry)
    vlm = entry.vlm
    cfg = vlm.config
    counts = vlm.parameter_counts()
    d = vlm.describe()
    arch = cfg.text.model_type
    info = {"general.architecture": arch, "general.parameter_count": sum(counts.values()),
            "general.basename": entry.name, "foveal.layout": d["layout"], "foveal.family": d["family"],
            f"{arch}.context_length": vlm.context_length, f"{arch}.embedding_length": cfg.text.hidden_size,
            f"{arch}.block_count": cfg.text.num_hidden_layers,
            f"{arch}.attention.head_count": cfg.text.num_attention_heads,
            f"{arch}.attention.head_count_kv": cfg.text.num_key_value_heads,
            f"{arch}.vocab_size": cfg.text.vocab_size}
    projector_info = None
    if d["vision_tower"] is not None:
        info.update({"vision.image_size": d["image_size"], "vision.patch_size": d["patch_size"],
                     "vision.block_count": d["vision_layers"],
                     "vision.embedding_length": d["vision_hidden_size"],
                     "vision.image_tokens_per_image": d["image_tokens_per_image"],
                     **({"vision.image_grid_pinpoints": [x for p in d["image_grid_pinpoints"] for x in p],
                         "vision.max_image_tokens": d["max_image_tokens"]} if d["image_grid_pinpoints"] else {}),
                     **({"vision.min_pixels": d["min_pixels"], "vision.max_pixels": d["max_pixels"],
                         "vision.max_image_tokens": d["max_image_tokens"]} if d.get("max_pixels") else {})})
        projector_info = {"projector.type": d["projector"], "projector.parameter_count": counts["projector"]}
    params = "\n".join(f"{k:<16}{v}" for k, v in (("temperature", 0.8), ("top_k", 40), ("top_p", 0.9)))
    return {"modelfile": f"# served by foveal {__version__}\nFROM {entry.path}\n", "parameters": params,
            "template": vlm.prompt.template, "details": details(entry), "model_info": info,
            "projector_info": projector_info,
            "capabilities": ["completion"] + (["vision"] if d["vision_tower"] is not None else []),
            "modified_at": _iso(entry.modified_at)}


@router.post("/api/generate")
async def generate(request: Request, body: GenerateRequest):
    return await answer_generate(request, body)


async def answer_generate(request: Request, body: GenerateRequest, images: list | None = None):
    """/api/generate's answer. `images`: already read (bytes; the upload route, server/upload.py), or
    None to take them from `body.images`."""
    t_request = time.perf_counter()
    refuse_unsupported(body, "generate")
    think = show_thinking(body.think)
    fmt = output_format(body.format)
    st = state_of(request)
    entry = st.registry.get(body.model)
    keep = keep_alive_seconds(body.keep_alive)
    if images is None:
        images = images_of(body.images, "images", st, [0])
    if not body.prompt and not images:
        load_s = await st.registry.ensure_loaded(entry)
        st.registry.keep_alive(entry, keep)
        return await _load_only(st, entry, keep, False, load_s)
    load_s = await st.registry.ensure_loaded(entry)
    st.registry.keep_alive(entry, keep)
    opts = sampling_options(body.options, entry.vlm.context_length, fmt)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
               [{"role": "user", "content": body.prompt or "", "images": images}]
    return await _respond(request, st, entry, keep, messages, opts, False, body.stream is not False, load_s,
                          t_request, think)


@router.post("/api/chat")
async def chat(request: Request, body: ChatRequest):
    t_request = time.perf_counter()
    refuse_unsupported(body, "chat")
    think = show_thinking(body.think)
    fmt = output_format(body.format)
    st = state_of(request)
    entry = st.registry.get(body.model)
    keep = keep_alive_seconds(body.keep_alive)
    if len(body.messages or []) > st.config.max_messages:
        raise APIError(400, f"too many messages: at most {st.config.max_messages}", param="messages")
    counter, messages = [0], []
    for i, m in enumerate(body.messages or []):
        messages.append({"role": m.role, "content": with_thought(m.content or "", m.thinking),
                         "images": images_of(m.images, f"messages[{i}].images", st, counter)})
    load_s = await st.registry.ensure_loaded(entry)
    st.registry.keep_alive(entry, keep)
    if not messages:
        return await _load_only(st, entry, keep, True, load_s)
    opts = sampling_options(body.options, entry.vlm.context_length, fmt)
    return await _respond(request, st, entry, keep, messages, opts, True, body.stream is not False, load_s,
                          t_request, think)
