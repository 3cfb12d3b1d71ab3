"""Turn image references from HTTP requests into bytes, under the operator's rules.

Design decisions:
- `foveal.processing.images.load_image` also reads file paths; a server must never let a client
  name a path that way. So every image a request carries is resolved here into bytes (or a
  `data:` URI, which load_image decodes without touching the filesystem) before it reaches the model.
- Ollama images are plain standard base64 (a `data:` URI is tolerated). OpenAI `image_url` takes
  `data:` URIs; `http(s)` URLs only for hosts the operator allow-listed (exact host match, fetch
  with a timeout and a size cap, no redirects followed); `file://` only under the configured image
  root, with `..` segments refused and symlinks resolved before the containment check.
- OpenAI-style `video_url` parts follow the same rules with their own byte limit
  (`max_video_bytes`); a `data:` URI must say video/*. A video reaches the model as bytes.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .config import ServerConfig
from .errors import APIError


MIN_IMAGE_BYTES = 16    # no image format fits in less; shorter data is refused before decoding


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, "image_error", param=param)


def _sized(data: bytes, where: str) -> bytes:
    if len(data) < MIN_IMAGE_BYTES:
        raise _bad(f"{where} is only {len(data)} bytes: too short to be an image", where)
    return data


def decode_base64_image(value, where: str, config: ServerConfig):
    """An Ollama `images` entry -> bytes (or a data: URI string)."""
    if not isinstance(value, str):
        raise _bad(f"{where} must be a base64 string, got {type(value).__name__}", where)
    if value.startswith("data:"):
        return _data_uri(value, where)
    compact = "".join(value.split())
    if not compact:
        raise _bad(f"{where} is empty", where)
    if len(compact) * 3 // 4 > config.max_body_bytes:
        raise _bad(f"{where} is larger than the request body limit", where)
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where} is not valid base64 (send the image file's bytes base64-encoded, "
                   f"without a 'data:' prefix)", where) from None
    return _sized(data, where)


async def resolve_image_url(url, where: str, config: ServerConfig):
    """An OpenAI `image_url` -> bytes or a data: URI string."""
    if not isinstance(url, str) or not url:
        raise _bad(f"{where} must be a non-empty URL string", where)
    if url.startswith("data:"):
        return _data_uri(url, where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        return await _fetch(url, where, config)
    if scheme == "file":
        return _read_under_root(url, where, config)
    raise _bad(f"{where} must be a data: URI (data:image/png;base64,...), an http(s) URL on an "
               f"allow-listed host, or a file:// URL under the image root; got {_preview(url)}", where)


async def resolve_video_url(url, where: str, config: ServerConfig) -> bytes:
    """A `video_url` -> the video's bytes, under the image rules and max_video_bytes."""
    if not isinstance(url, str) or not url:
        raise _bad(f"{where} must be a non-empty URL string", where)
    limit = config.max_video_bytes
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().startswith("data:video/") or ";base64" not in header.lower():
            raise _bad(f"{where} must be a base64 data URI of a video (data:video/mp4;base64,...), "
                       f"got {_preview(header)}", where)
        compact = "".join(payload.split())
        if len(compact) * 3 // 4 > limit:
            raise _bad(f"{where}: video is over the limit of {limit} bytes", where)
        try:
            return _sized(base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True), where)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the data URI's payload is not valid base64", where) from None
    if scheme in ("http", "https"):
        return await _fetch(url, where, config, limit, "video")
    if scheme == "file":
        return _read_under_root(url, where, config, limit, "video")
    raise _bad(f"{where} must be a data: URI (data:video/mp4;base64,...), an http(s) URL on an "
               f"allow-listed host, or a file:// URL under the image root; got {_preview(url)}", where)


def _data_uri(uri: str, where: str):
    """Checked by load_image (media type, base64); here only: a payload too short to be an image."""
    header, comma, payload = uri.partition(",")
    if comma and ";base64" in header.lower():
        try:
            data = base64.b64decode("".join(payload.split()) + "=" * (-len("".join(payload.split())) % 4),
                                    validate=True)
        except (binascii.Error, ValueError):
            return uri          # load_image names the problem
        if header.lower().startswith("data:image/"):
            _sized(data, where)
    return uri


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_under_root(url: str, where: str, config: ServerConfig, limit: int | None = None,
                     what: str = "image") -> bytes:
    limit = config.max_body_bytes if limit is None else limit
    if config.image_root is None:
        raise _bad(f"{where}: file:// {what} URLs are disabled on this server (the operator can allow a "
                   f"folder with --image-root)", where)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _bad(f"{where}: file:// URL names host {parts.netloc!r}; only local files are allowed", where)
    raw = unquote(parts.path)
    if "\x00" in raw:
        raise _bad(f"{where}: file path contains a NUL byte", where)
    if ".." in Path(raw).parts:
        raise _bad(f"{where}: file path {_preview(raw)} contains '..'; paths may not leave the image root",
                   where)
    root = Path(config.image_root).resolve()
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        raise _bad(f"{where}: cannot resolve file path {_preview(raw)}", where) from None
    if not resolved.is_relative_to(root):
        raise _bad(f"{where}: file {_preview(raw)} is outside the image root", where)
    if not resolved.is_file():
        raise _bad(f"{where}: no such {what} file under the image root: {_preview(raw)}", where)
    size = resolved.stat().st_size
    if size > limit:
        raise _bad(f"{where}: file is {size} bytes, over the limit of {limit}", where)
    return _sized(resolved.read_bytes(), where)


async def _fetch(url: str, where: str, config: ServerConfig, limit: int | None = None,
                 what: str = "image") -> bytes:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed = {d.lower() for d in config.image_url_domains}
    if not host or host not in allowed:
        raise _bad(f"{where}: {what} URL host {host or '(none)'!r} is not allow-listed; send the {what} "
                   f"inline as a data: URI (the operator can allow hosts with --allow-image-host)", where)
    if parts.username or parts.password:
        raise _bad(f"{where}: {what} URLs with credentials are refused", where)
    import httpx
    limit = config.max_body_bytes if limit is None else limit
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=config.image_fetch_timeout_s,
                                     trust_env=False) as client:
            async with client.stream("GET", url) as resp:
                if 300 <= resp.status_code < 400:
                    raise _bad(f"{where}: {what} URL redirects (status {resp.status_code}); redirects are "
                               f"not followed", where)
                if resp.status_code != 200:
                    raise _bad(f"{where}: fetching the {what} URL returned HTTP {resp.status_code}", where)
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise _bad(f"{where}: {what} is {declared} bytes, over the limit of {limit}", where)
                data = bytearray()
                async for piece in resp.aiter_bytes():
                    data += piece
                    if len(data) > limit:
                        raise _bad(f"{where}: {what} is over the limit of {limit} bytes", where)
                return _sized(bytes(data), where)
    except httpx.TimeoutException:
        raise _bad(f"{where}: fetching the {what} URL timed out after {config.image_fetch_timeout_s:g} s",
                   where) from None
    except httpx.HTTPError as e:
        raise _bad(f"{where}: fetching the {what} URL failed ({type(e).__name__})", where) from None
