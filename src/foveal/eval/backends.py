"""Who answers: a local model (`foveal.load`) or any server speaking the OpenAI chat-completions
or the Ollama chat API.

Design decisions:
- One method, `answer(image, prompt, max_tokens) -> str`, greedy (temperature 0), so every
  backend is scored by the same harness and the same prompts.
- HTTP goes through httpx with the wire formats the official clients send: OpenAI content parts
  with the image as a `data:` URI, Ollama `images: [base64]` with `options.num_predict`.
- A problem with one item (the server answers 400/413/422, the local model refuses an image or
  the prompt does not fit) raises `ItemError`: the runner records it and goes on. A problem with
  the backend (unreachable, 401/403/404, 5xx after retries) raises `EndpointError` and stops
  the run; what was answered so far is kept for the resume.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from ..errors import ContextLengthError, ImageError, PromptError
from .errors import EndpointError, EvalConfigError

APIS = ("openai", "ollama")
ITEM_STATUS = (400, 413, 415, 422)
RETRY_STATUS = (429, 500, 502, 503, 504)


class ItemError(Exception):
    """This one question could not be answered; the run goes on."""


def _image_bytes(image) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    return "application/octet-stream"


class LocalBackend:
    kind = "local"

    def __init__(self, vlm):
        self.vlm = vlm

    def describe(self) -> dict:
        return {"kind": self.kind, "model": str(self.vlm.path), "name": self.vlm.name,
                "dtype": str(self.vlm.dtype).replace("torch.", ""), "device": str(self.vlm.device)}

    def identity(self) -> dict:
        """What must match for a resumed run to continue this one's answers."""
        return {"kind": self.kind, "model": str(self.vlm.path), "dtype": str(self.vlm.dtype).replace("torch.", "")}

    @property
    def short_name(self) -> str:
        return self.vlm.name

    def answer(self, image, prompt: str, max_tokens: int) -> str:
        content = ([{"type": "image", "image": image}] if image is not None else []) + \
                  [{"type": "text", "text": prompt}]
        try:
            return self.vlm.generate([{"role": "user", "content": content}], max_tokens=max_tokens,
                                     temperature=0.0).text
        except (ImageError, PromptError, ContextLengthError) as e:
            raise ItemError(str(e)) from None

    def close(self) -> None:
        pass


class HTTPBackend:
    kind = "http"
    path = ""

    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 300.0, retries: int = 2, client=None):
        import httpx
        if not endpoint or not str(endpoint).startswith(("http://", "https://")):
            raise EvalConfigError(f"--endpoint must be an http:// or https:// URL, got {endpoint!r}")
        self.endpoint = str(endpoint).rstrip("/")
        self.retries = retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout, headers=headers)
        self.model = model or self._default_model()

    @property
    def short_name(self) -> str:
        return f"{self.kind}-{self.model}"

    def describe(self) -> dict:
        return {"kind": self.kind, "endpoint": self.endpoint, "model": self.model}

    def identity(self) -> dict:
        return self.describe()

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, url: str, **kwargs):
        import httpx
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                r = self.client.request(method, url, **kwargs)
            except httpx.HTTPError as e:
                if attempt == self.retries:
                    raise EndpointError(f"cannot reach {url}: {e.__class__.__name__}: {e}") from None
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError:
                        raise EndpointError(f"{url} answered with something that is not JSON: "
                                            f"{r.text[:200]!r}") from None
                detail = r.text[:300]
                if r.status_code in ITEM_STATUS:
                    raise ItemError(f"HTTP {r.status_code}: {detail}")
                if r.status_code not in RETRY_STATUS or attempt == self.retries:
                    raise EndpointError(f"{url} answered HTTP {r.status_code}: {detail}")
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _default_model(self) -> str:
        raise NotImplementedError


class OpenAIBackend(HTTPBackend):
    """POST {base}/v1/chat/completions (base may already end in /v1)."""
    kind = "openai"

    def _base(self) -> str:
        base = self.endpoint
        for tail in ("/chat/completions", "/v1"):
            if base.endswith(tail):
                base = base[: -len(tail)]
        return base + "/v1"

    def _default_model(self) -> str:
        data = self._request("GET", self._base() + "/models")
        models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
        if not models:
            raise EndpointError(f"{self._base()}/models lists no model; name one (foveal eval MODEL --endpoint ...)")
        return models[0]

    def answer(self, image, prompt: str, max_tokens: int) -> str:
        content = [{"type": "text", "text": prompt}]
        if image is not None:
            data = _image_bytes(image)
            uri = f"data:{_mime(data)};base64,{base64.b64encode(data).decode()}"
            content.insert(0, {"type": "image_url", "image_url": {"url": uri}})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.0, "stream": False}
        data = self._request("POST", self._base() + "/chat/completions", json=body)
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"unexpected chat-completions answer: {str(data)[:200]}") from None


class OllamaBackend(HTTPBackend):
    """POST {base}/api/chat with stream false."""
    kind = "ollama"

    def _base(self) -> str:
        base = self.endpoint
        for tail in ("/chat", "/api"):
            if base.endswith(tail):
                base = base[: -len(tail)]
        return base + "/api"

    def _default_model(self) -> str:
        data = self._request("GET", self._base() + "/tags")
        models = [m.get("name") or m.get("model") for m in data.get("models", []) if isinstance(m, dict)] \
            if isinstance(data, dict) else []
        if not models:
            raise EndpointError(f"{self._base()}/tags lists no model; name one (foveal eval MODEL --endpoint ...)")
        return models[0]

    def answer(self, image, prompt: str, max_tokens: int) -> str:
        message = {"role": "user", "content": prompt}
        if image is not None:
            message["images"] = [base64.b64encode(_image_bytes(image)).decode()]
        body = {"model": self.model, "messages": [message], "stream": False,
                "options": {"temperature": 0.0, "num_predict": max_tokens}}
        data = self._request("POST", self._base() + "/chat", json=body)
        try:
            return data["message"]["content"] or ""
        except (KeyError, TypeError):
            raise EndpointError(f"unexpected Ollama chat answer: {str(data)[:200]}") from None


def endpoint_backend(endpoint: str, api: str = "openai", model: str | None = None, api_key: str | None = None,
                     **kwargs) -> HTTPBackend:
    if api not in APIS:
        raise EvalConfigError(f"unknown --api {api!r}; choose from {', '.join(APIS)}")
    if api_key is None:
        api_key = os.environ.get("FOVEAL_API_KEY") or (os.environ.get("OPENAI_API_KEY") if api == "openai" else None)
    cls = OpenAIBackend if api == "openai" else OllamaBackend
    return cls(endpoint, model=model, api_key=api_key, **kwargs)

