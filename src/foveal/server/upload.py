"""POST /api/v1/analyze: /api/generate for image files sent as multipart/form-data (curl -F, an HTML form).

Design decisions:
- The answer is /api/generate's: the form becomes a `GenerateRequest`, the files its images (as bytes),
  and `ollama.answer_generate` does the rest, so the NDJSON chunks, the final object's timings and
  every error found from there on are the JSON route's.
- The body is parsed here, chunk by chunk, with python-multipart's streaming parser, not FastAPI's
  `UploadFile` (which spools whole files to disk before the route sees them): each limit is checked
  when the bytes that break it arrive. A part's type, a field's name and the image count at the part's
  headers; a file's size (413) at the chunk that crosses it; the body size by Guard (security.py).
  The per-file limit is the model's `image_limits.max_bytes` (the defaults while the model is not
  loaded yet), never more than the body limit.
- Part types: the image/* types the decoder reads, or application/octet-stream / none (what curl sends
  for a .webp or .bmp), whose bytes decide. Any other type is 415, naming the part and its type.
- Every file's header is probed (format, pixel count, minimum side) before the request is queued, so a
  text file called cat.png or a decompression bomb is refused naming the part; a truncated file is
  found when it is decoded, with /api/generate's error.
- Fields: prompt (required), image (0 to max_images files, in order), model (optional when the server
  serves one model), options (a JSON object: Ollama's options), and as in /api/generate, as text:
  stream, system, format ("json" or a JSON schema), think, keep_alive. An empty field other than prompt,
  or an empty file part without a file name, counts as absent (what a browser sends for inputs left
  blank). An unknown or repeated field is 400; the number of parts is bounded.
- No image: a text-only answer, as /api/generate without images. An empty prompt without an image
  is refused (in /api/generate it would only load the model).
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from pydantic import ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from ..errors import ImageError
from ..processing.images import ImageLimits, probe_image
from .common import state_of
from .errors import APIError, clean, describe_validation
from .models import ClientDisconnected
from .ollama import GenerateRequest, answer_generate

router = APIRouter()
# python-multipart logs a warning for each malformed body it meets; the client gets the 400 instead
_parser_log = logging.getLogger("foveal.server.upload.parser")
_parser_log.addHandler(logging.NullHandler())
_parser_log.propagate = False
PATH = "/api/v1/analyze"
IMAGE_FIELD = "image"
TEXT_FIELDS = ("prompt", "model", "options", "stream", "system", "format", "think", "keep_alive")
# The decoder's formats (processing/images.py: PNG JPEG GIF WEBP BMP TIFF PPM AVIF) by their media types,
# common aliases included; tests/test_server_upload.py checks that each format has its type here.
IMAGE_TYPES = ("image/png", "image/apng", "image/jpeg", "image/jpg", "image/pjpeg", "image/gif", "image/webp",
               "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/x-portable-anymap",
               "image/x-portable-pixmap", "image/x-portable-graymap", "image/x-portable-bitmap", "image/avif")
SHOWN_TYPES = "image/png, image/jpeg, image/gif, image/webp, image/bmp, image/tiff, image/avif"
SNIFFED_TYPES = ("", "application/octet-stream")      # no type claimed: the bytes decide
PLAIN_ENCODINGS = ("", "binary", "7bit", "8bit")
MAX_UNKNOWN_PARTS = 16       # parts under unknown names, read and dropped before the 400 that names them

_FORM_SCHEMA = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "description": "the question about the images"},
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "image files (PNG, JPEG, GIF, WebP, BMP, TIFF, PPM, AVIF), in order"},
        "model": {"type": "string", "description": "a served model; optional when the server serves one"},
        "options": {"type": "string", "description": "Ollama's options as a JSON object, e.g. "
                                                     "{\"temperature\": 0, \"num_predict\": 64}"},
        "stream": {"type": "boolean", "default": True, "description": "NDJSON chunks (true) or one object"},
        "system": {"type": "string"},
        "format": {"type": "string", "description": "\"json\" or a JSON schema (as JSON text)"},
        "think": {"type": "string", "enum": ["true", "false", "low", "medium", "high"]},
        "keep_alive": {"type": "string", "description": "seconds or a duration such as 5m"},
    },
}


class _Part:
    def __init__(self, number: int):
        self.number = number               # 1-based among all parts
        self.headers: dict[str, str] = {}
        self.name = ""
        self.filename: str | None = None
        self.content_type = ""
        self.data = bytearray()
        self.limit = 0
        self.keep = True                   # False: an unknown field, read and dropped
        self.image_number = 0              # 1-based among the image parts
        self.over_count = False            # an image part past max_images, unless it turns out blank

    def label(self) -> str:
        shown = f" ({_quoted(self.filename)})" if self.filename else ""
        return f"image part {self.image_number}{shown}"


class _FormReader:
    """Feeds the body to python-multipart and refuses a part as soon as it breaks a limit."""

    def __init__(self, boundary: bytes, request):
        self.state = state_of(request)
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end,
            "on_end": self._finished})
        self.parser.logger = _parser_log
        self.fields: dict[str, str] = {}
        self.images: list[_Part] = []
        self.unknown: list[str] = []
        self.ended = False
        self._parts = 0
        self._part: _Part | None = None
        self._field, self._value = bytearray(), bytearray()

    def write(self, chunk: bytes) -> None:
        if not self.ended:
            self.parser.write(chunk)

    # ---- python-multipart callbacks -------------------------------------------------------
    def _begin(self):
        self._parts += 1
        most = self.state.config.max_images + len(TEXT_FIELDS) + MAX_UNKNOWN_PARTS
        if self._parts > most:          # each part costs a little: no form of a million empty ones
            raise APIError(400, f"too many parts in the form: at most {most} "
                                f"({self.state.config.max_images} images and the fields)")
        self._part = _Part(self._parts)

    def _header_field(self, data, start, end):
        self._field += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        self._part.headers.setdefault(self._field.decode("latin-1").strip().lower(), self._value.decode("latin-1"))
        self._field, self._value = bytearray(), bytearray()

    def _headers_done(self):
        part, config = self._part, self.state.config
        kind, params = parse_options_header(part.headers.get("content-disposition"))
        if kind != b"form-data":
            raise APIError(400, f"multipart part {part.number} has no 'Content-Disposition: form-data' header")
        name = params.get(b"name")
        if not name:
            raise APIError(400, f"multipart part {part.number} has no name (Content-Disposition: form-data; "
                                f"name=\"...\")")
        part.name = name.decode("utf-8", "replace")
        part.filename = params[b"filename"].decode("utf-8", "replace") if b"filename" in params else None
        encoding = part.headers.get("content-transfer-encoding", "").strip().lower()
        if encoding not in PLAIN_ENCODINGS:
            raise APIError(400, f"multipart part {part.number} ({_quoted(part.name)}) has Content-Transfer-Encoding "
                                f"{_quoted(encoding)}; send the bytes as they are (binary)")
        if part.name == IMAGE_FIELD:
            part.image_number = len(self.images) + 1
            if part.image_number > config.max_images:
                if part.filename != "":             # else: maybe a blank file input, refused at its first byte
                    raise self.too_many_images()
                part.over_count = True
            part.content_type = parse_options_header(part.headers.get("content-type"))[0].decode("latin-1")
            if part.content_type not in IMAGE_TYPES + SNIFFED_TYPES:
                raise APIError(415, f"{part.label()} has content type {_quoted(part.content_type)}, not an image "
                                    f"type foveal reads ({SHOWN_TYPES}; or application/octet-stream)",
                               "unsupported_media_type", param="image")
            part.limit = self.file_limit()
        elif part.name in TEXT_FIELDS:
            if part.name in self.fields:
                raise APIError(400, f"field {_quoted(part.name)} is given twice", param=part.name)
            part.limit = config.max_body_bytes
        else:
            if part.name not in self.unknown:
                self.unknown.append(part.name)
            part.keep = False

    def _data(self, data, start, end):
        part = self._part
        if not part.keep:
            return
        if part.over_count:
            raise self.too_many_images()
        if len(part.data) + (end - start) > part.limit:
            raise APIError(413, f"{part.label()} is over the limit of {part.limit} bytes per image", "body_too_large",
                           param="image")
        part.data += data[start:end]

    def _end(self):
        part = self._part
        if not part.keep:
            return
        if part.name == IMAGE_FIELD:
            if part.filename == "" and not part.data:
                return                  # a browser's file input left blank: no image
            self.images.append(part)
            return
        try:
            self.fields[part.name] = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f"field {_quoted(part.name)} is not UTF-8 text", param=part.name) from None

    def _finished(self):
        self.ended = True

    def too_many_images(self) -> APIError:
        return APIError(400, f"too many images: at most {self.state.config.max_images} per request", "image_error",
                        param="images")

    # ---- limits that depend on the model ----------------------------------------------------
    def model_name(self) -> str:
        named = self.fields.get("model", "").strip()
        entries = self.state.registry.entries
        return named or (next(iter(entries)) if len(entries) == 1 else "")

    def image_limits(self) -> ImageLimits:
        try:
            vlm = self.state.registry.get(self.model_name()).vlm
        except APIError:           # no such model: refused later, with /api/generate's error
            vlm = None
        return vlm.image_limits if vlm is not None else ImageLimits()

    def file_limit(self) -> int:
        return min(self.state.config.max_body_bytes, self.image_limits().max_bytes)


def _quoted(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


async def _read_form(request: Request) -> _FormReader:
    # (Guard has relabelled any other type as application/json, so the type the client sent is not named)
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        raise APIError(415, f"{PATH} takes a multipart/form-data body (curl -F 'prompt=...' -F 'image=@photo.jpg'); "
                            f"for JSON with base64 images use /api/generate", "unsupported_media_type")
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "the multipart/form-data Content-Type has no boundary parameter")
    try:
        reader = _FormReader(boundary, request)
        async for chunk in request.stream():
            if chunk:
                reader.write(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    except FormParserError as e:
        raise APIError(400, f"malformed multipart body: {clean(str(e), 200)}") from None
    if not reader.ended:
        raise APIError(400, "the multipart body ended before its closing boundary (--boundary--)")
    if reader.unknown:
        raise APIError(400, f"unknown form field{'s' if len(reader.unknown) > 1 else ''} "
                            f"{', '.join(_quoted(n) for n in reader.unknown[:10])}; {PATH} takes "
                            f"{', '.join((TEXT_FIELDS[0], IMAGE_FIELD) + TEXT_FIELDS[1:])}")
    return reader


def _json_field(fields: dict, name: str, want_object: bool):
    text = fields[name]
    try:
        value = json.loads(text)
    except ValueError as e:
        raise APIError(400, f"field {_quoted(name)} is not valid JSON ({clean(str(e), 120)})", param=name) from None
    if want_object and not isinstance(value, dict):
        raise APIError(400, f"field {_quoted(name)} must be a JSON object such as {{\"temperature\": 0}}, got "
                            f"{type(value).__name__}", param=name)
    return value


def _boolean(fields: dict, name: str) -> bool:
    value = fields[name].strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise APIError(400, f"field {_quoted(name)} must be true or false, got {_quoted(fields[name])}", param=name)


def generate_request(reader: _FormReader, has_images: bool) -> GenerateRequest:
    """The form's fields as the body /api/generate would have received."""
    fields = {k: v for k, v in reader.fields.items() if k == "prompt" or v.strip()}
    if "prompt" not in fields:
        raise APIError(400, "field 'prompt' is required: the question about the image(s)", param="prompt")
    if not fields["prompt"].strip() and not has_images:
        raise APIError(400, "field 'prompt' is empty and no image was sent: nothing to answer", param="prompt")
    body = {"model": reader.model_name(), "prompt": fields["prompt"]}
    for name in ("system", "keep_alive"):
        if name in fields:
            body[name] = fields[name]
    if "options" in fields:
        body["options"] = _json_field(fields, "options", want_object=True)
    if "stream" in fields:
        body["stream"] = _boolean(fields, "stream")
    if "think" in fields:
        body["think"] = _boolean(fields, "think") if fields["think"].strip().lower() in ("true", "false") \
            else fields["think"]
    if "format" in fields:
        body["format"] = _json_field(fields, "format", want_object=False) \
            if fields["format"].lstrip().startswith("{") else fields["format"]
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise APIError(400, describe_validation(e.errors())) from None


@router.post(PATH, summary="Answer a prompt about uploaded image files (multipart/form-data)",
             description="/api/generate with the images as multipart/form-data file parts instead of base64: "
                         "the same answer, NDJSON stream (default) or one object with `stream=false`, the same "
                         "timings and errors.",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                 "schema": _FORM_SCHEMA}}}})
async def analyze(request: Request):
    reader = await _read_form(request)
    body = generate_request(reader, bool(reader.images))
    limits = reader.image_limits()
    images = []
    for part in reader.images:
        data, part.data = bytes(part.data), bytearray()
        try:
            probe_image(data, limits, part.label())
        except ImageError as e:
            message = str(e) if str(e).startswith(part.label()) else f"{part.label()}: {e}"
            raise APIError(400, clean(message), "image_error", param="image") from None
        images.append(data)
    return await answer_generate(request, body, images)
