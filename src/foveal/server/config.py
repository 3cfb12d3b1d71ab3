"""Server settings and the bind-safety check.

Design decisions:
- Safe by default: bind 127.0.0.1; a non-loopback bind needs an API key (or an explicit
  `insecure=True`), because the API runs a model on anyone's input and can read allow-listed files.
- The default port is 11435: one above Ollama's 11434, so both can run side by side and the number
  is easy to remember ("Ollama's port plus one").
- Every limit lives here with its default, so the CLI, the tests and the docs read one place.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None                 # bearer key required on every route but /health
    insecure: bool = False                     # allow a non-loopback bind without a key
    allowed_hosts: list[str] = field(default_factory=list)   # extra Host header values; "*" = any
    cors_origins: list[str] = field(default_factory=list)    # empty: no CORS headers at all
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024          # request line + headers; over it: 431
    max_queue: int = 16                        # admitted requests (running + waiting) per model
    max_images: int = 8                        # images in one request
    max_videos: int = 2                        # videos in one request (OpenAI video_url parts)
    max_video_bytes: int = 256 * 1024 * 1024   # one video (a file:// or fetched one; data: URIs fit the body)
    max_messages: int = 1024
    image_url_domains: list[str] = field(default_factory=list)   # http(s) image hosts allowed
    image_fetch_timeout_s: float = 10.0
    image_root: Path | None = None             # file:// images allowed only under this folder
    keep_alive_s: float = 300.0                # default idle time before a model unloads; < 0: forever
    retry_after_s: int = 1                     # Retry-After on a full queue

    def check_bind(self) -> None:
        """Refuse to expose the API beyond this machine without a key, unless told so."""
        if is_loopback(self.host) or self.api_key or self.insecure:
            return
        raise ConfigError(f"refusing to listen on {self.host!r} (reachable from other machines) without "
                          f"an API key: pass --api-key KEY (or set FOVEAL_API_KEY), or --insecure to "
                          f"serve without one")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_duration(value, what: str = "keep_alive") -> float:
    """Ollama durations: seconds as a number, or a Go duration string ("5m", "1h30m", "10s", "-1")."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds or a duration such as '5m', got {value!r}")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} must be finite, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a number of seconds or a duration such as '5m', got {value!r}")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", rest)
    if not parts or "".join(n + u for n, u in parts) != rest:
        raise ValueError(f"{what} {value!r} is not a duration; use seconds or forms like '30s', '5m', '1h'")
    for number, unit in parts:
        total += float(number) * units[unit]
    return sign * total
