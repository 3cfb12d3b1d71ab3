"""OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions (text, image_url and video_url parts).

Follows the OpenAI chat completions reference and what the official `openai` client parses:
SSE streaming (`data: {...}` events ending in `data: [DONE]`), `usage` and
`stream_options.include_usage`, errors as `{"error": {"message", "type", "param", "code"}}`.
`response_format` json_object / json_schema is enforced by constrained decoding (engine/constrain.py);
with finish_reason "length" the JSON may be incomplete, as with OpenAI.
Adds llama-server's `timings` object (ms and tokens per second per stage). A model's thought
(engine/thinking.py) goes to `message.reasoning_content` / `delta.reasoning_content`, as vLLM and
DeepSeek's API send it, never to `content`; an assistant message's `reasoning_content` is given back to
the model in front of its content.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from .. import __version__
from ..engine.thinking import with_thought
from .common import rest_of, start_generation, state_of, validate_options
from .errors import APIError, as_api_error, error_line
from .images import resolve_image_url, resolve_video_url
from .models import WatchedStreamingResponse

router = APIRouter()
Number = Union[StrictInt, StrictFloat]
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[Any]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    logprobs: StrictBool | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    # foveal's own (extra_body): each image's token budget on a dynamic-resolution model
    min_image_tokens: StrictInt | None = None
    max_image_tokens: StrictInt | None = None


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param=param)


def _check_range(name: str, value, lo: float, hi: float) -> None:
    if value is not None and not (lo <= value <= hi):
        raise _bad(f"{name} must be between {lo:g} and {hi:g}, got {value}", name)


def sampling_options(body: ChatCompletionRequest, context_length: int) -> dict:
    if body.n not in (None, 1):
        raise _bad(f"n must be 1 (foveal returns one choice), got {body.n}", "n")
    if body.logprobs:
        raise _bad("logprobs are not supported by foveal yet", "logprobs")
    if body.tools:
        raise _bad("tools are not supported by foveal yet", "tools")
    fmt = output_format(body.response_format)
    _check_range("temperature", body.temperature, 0, 2)
    _check_range("frequency_penalty", body.frequency_penalty, -2, 2)
    _check_range("presence_penalty", body.presence_penalty, -2, 2)
    if body.top_p is not None and not (0 < body.top_p <= 1):
        raise _bad(f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"{name} must be >= 1, got {max_tokens}", name)
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise _bad(f"stop takes at most 4 sequences, got {len(body.stop)}", "stop")
    opts = {"max_tokens": max_tokens or context_length, "temperature": 1.0 if body.temperature is None
            else body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stop,
            "min_image_tokens": body.min_image_tokens, "max_image_tokens": body.max_image_tokens}
    opts = {k: v for k, v in opts.items() if v is not None}
    validate_options(opts, {"max_tokens": name})
    if fmt is not None:
        opts["format"] = fmt
    return opts


def output_format(fmt: dict | None):
    """response_format -> the engine's `format`: None (text), "json" (json_object) or a schema dict.
    json_schema is always enforced strictly (constrained decoding), whatever `strict` says."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind != "json_schema":
        raise _bad(f"response_format type must be text, json_object or json_schema, got {_short(kind)}",
                   "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema must be an object with 'name' and 'schema'", "response_format")
    if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise _bad("response_format.json_schema: 'name' must be a string and 'strict' a boolean", "response_format")
    schema = spec.get("schema")
    if schema is None:
        return "json"
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema must be a JSON schema object", "response_format")
    return schema


async def convert_messages(raw: list, state) -> list[dict]:
    if not raw:
        raise _bad("messages must be a non-empty list", "messages")
    if len(raw) > state.config.max_messages:
        raise _bad(f"too many messages: at most {state.config.max_messages}", "messages")
    out, n_images, n_videos = [], 0, 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {_short(role)}", "messages")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise _bad(f"{where}.content is required", "messages")
            content = ""
        thought = m.get("reasoning_content") if role == "assistant" else None
        if thought is not None and not isinstance(thought, str):
            raise _bad(f"{where}.reasoning_content must be a string", "messages")
        if isinstance(content, str):
            out.append({"role": ROLES[role], "content": with_thought(content, thought)})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of content parts", "messages")
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{pw} must be an object with a 'type'", "messages")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pw}.text must be a string", "messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                n_images += 1
                if n_images > state.config.max_images:
                    raise APIError(400, f"too many images: at most {state.config.max_images} per request",
                                   "image_error", param="messages")
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if isinstance(spec, dict) and spec.get("detail") not in (None, "auto", "low", "high"):
                    raise _bad(f"{pw}.image_url.detail must be auto, low or high", "messages")
                image = await resolve_image_url(url, f"{pw}.image_url", state.config)
                parts.append({"type": "image", "image": image})
            elif kind == "video_url":       # vLLM's form: {"type": "video_url", "video_url": {"url": ...}}
                n_videos += 1
                if n_videos > state.config.max_videos:
                    raise APIError(400, f"too many videos: at most {state.config.max_videos} per request",
                                   "image_error", param="messages")
                spec = part.get("video_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                video = await resolve_video_url(url, f"{pw}.video_url", state.config)
                parts.append({"type": "video", "video": video})
            else:
                raise _bad(f"{pw}.type must be 'text', 'image_url' or 'video_url', got {_short(kind)}", "messages")
        if thought:
            parts.insert(0, {"type": "text", "text": with_thought("", thought)})
        out.append({"role": ROLES[role], "content": parts})
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def timings(stats) -> dict:
    return {"prompt_n": stats.prompt_tokens - stats.cached_tokens, "prompt_ms": stats.prefill_s * 1e3,
            "prompt_per_second": stats.prefill_tokens_per_s, "predicted_n": stats.generated_tokens,
            "predicted_ms": stats.decode_s * 1e3, "predicted_per_second": stats.decode_tokens_per_s,
            "cache_n": stats.cached_tokens, "images": stats.images, "videos": stats.videos,
            "video_frames": stats.video_frames, "image_decode_ms": stats.preprocess_s * 1e3,
            "vision_encode_ms": stats.encode_s * 1e3}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


@router.get("/v1/models")
async def list_models(request: Request):
    st = state_of(request)
    return {"object": "list", "data": [{"id": e.name, "object": "model", "created": int(e.modified_at),
                                        "owned_by": "foveal"} for e in st.registry.entries.values()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    e = state_of(request).registry.get(model_id)
    return {"id": e.name, "object": "model", "created": int(e.modified_at), "owned_by": "foveal"}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    st = state_of(request)
    entry = st.registry.get(body.model)
    if body.stream_options is not None and not body.stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    messages = await convert_messages(body.messages, st)
    sampling_options(body, 1 << 30)      # validate before loading
    await st.registry.ensure_loaded(entry)
    st.registry.keep_alive(entry, None)
    opts = sampling_options(body, entry.vlm.context_length)
    gen, first = await start_generation(request, entry, messages, opts)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "created": created, "model": entry.name, "system_fingerprint": f"foveal-{__version__}"}

    if not body.stream:
        chunks = [first] + await gen.collect(request)
        last = chunks[-1]
        message = {"role": "assistant", "content": "".join(c.text for c in chunks)}
        if thinking := "".join(c.thinking for c in chunks):
            message["reasoning_content"] = thinking
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": message,
            "logprobs": None, "finish_reason": _finish(last.finish_reason)}],
            "usage": usage(last.stats), "timings": timings(last.stats)})

    def event(choices, **extra) -> bytes:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"\
            .encode()

    async def events():
        try:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
            chunk = first
            later = rest_of(gen, request)
            while chunk is not None:
                if chunk.thinking:
                    yield event([{"index": 0, "delta": {"reasoning_content": chunk.thinking}, "logprobs": None,
                                  "finish_reason": None}])
                if chunk.text:
                    yield event([{"index": 0, "delta": {"content": chunk.text}, "logprobs": None,
                                  "finish_reason": None}])
                if chunk.done:
                    yield event([{"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": _finish(chunk.finish_reason)}], timings=timings(chunk.stats))
                    if include_usage:
                        yield event([], usage=usage(chunk.stats))
                    break
                chunk = await later.__anext__()
            yield b"data: [DONE]\n\n"
        except StopAsyncIteration:
            yield b"data: [DONE]\n\n"
        except Exception as e:   # noqa: BLE001 - after the status line: an error event
            yield error_line(as_api_error(e), openai=True)
        finally:
            gen.cancel.set()

    return WatchedStreamingResponse(events(), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
