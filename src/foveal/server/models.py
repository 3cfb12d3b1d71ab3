"""Loaded models, admission into a bounded queue, and generation in worker threads.

Design decisions:
- A model is named by its folder name; `name:latest` (what Ollama clients often send) means the same.
- Models load on first use (or at start-up) in a thread, one load at a time per model, and unload
  after `keep_alive` seconds without requests; `keep_alive: 0` unloads as soon as the model is idle.
- Admission is a counter per model: requests running or waiting for the model. When it reaches
  `max_queue` the request is refused at once with 503 + Retry-After instead of piling up.
- Generation is CPU-bound, so it runs in its own thread; the thread holds the model's
  `engine.lock` for the whole request (image cache, prompt, KV cache), so requests on one model run
  one after another and never interleave. Chunks reach the event loop through an asyncio.Queue.
- Cancellation: every request owns a `threading.Event`; a client disconnect sets it and the engine
  checks it between tokens, so generation stops within a token's time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from starlette.responses import StreamingResponse

from ..errors import FovealError
from .config import ServerConfig
from .errors import APIError, as_api_error
from .metrics import Metrics

_END = object()


class ClientDisconnected(Exception):
    """The client went away while its request waited or generated; nothing is sent back."""


@dataclass
class ModelEntry:
    name: str
    path: Path
    vlm: object | None = None
    keep_alive_s: float = 300.0
    expires_at: float | None = None          # wall-clock time; None: never
    active: int = 0
    modified_at: float = field(default_factory=time.time)
    last_load_s: float = 0.0
    load_lock: asyncio.Lock | None = None
    counter_lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRegistry:
    def __init__(self, config: ServerConfig, metrics: Metrics, load_kwargs: dict | None = None):
        self.config, self.metrics = config, metrics
        self.load_kwargs = load_kwargs or {}
        self.entries: dict[str, ModelEntry] = {}

    # ---- catalogue ------------------------------------------------------------------
    def add_path(self, path) -> ModelEntry:
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FovealError(f"model {str(path)!r} not found: expected a folder with config.json and *.safetensors")
        return self._add(ModelEntry(path.name, path, keep_alive_s=self.config.keep_alive_s))

    def add_loaded(self, vlm, name: str | None = None) -> ModelEntry:
        entry = ModelEntry(name or vlm.name, Path(vlm.path), vlm, keep_alive_s=self.config.keep_alive_s)
        entry.last_load_s = getattr(vlm, "load_s", 0.0)
        self._touch(entry, None)
        return self._add(entry)

    def _add(self, entry: ModelEntry) -> ModelEntry:
        try:
            entry.modified_at = (entry.path / "config.json").stat().st_mtime
        except OSError:
            pass
        self.entries[entry.name] = entry
        self._gauges()
        return entry

    def get(self, name) -> ModelEntry:
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "field 'model' is required: name one of the served models "
                                f"({', '.join(self.entries) or 'none'})", "missing_model", param="model")
        key = name.strip()
        entry = self.entries.get(key) or self.entries.get(key.removesuffix(":latest"))
        if entry is None:
            shown = key if len(key) <= 80 else key[:80] + "..."
            raise APIError(404, f"model {shown!r} not found; this server serves: "
                                f"{', '.join(self.entries) or 'no models'}", "model_not_found", param="model")
        return entry

    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.entries.values() if e.vlm is not None]

    # ---- load / unload --------------------------------------------------------------
    async def ensure_loaded(self, entry: ModelEntry) -> float:
        """Load if needed; the seconds this call spent loading (0 when it was loaded)."""
        if entry.vlm is not None:
            return 0.0
        if entry.load_lock is None:
            entry.load_lock = asyncio.Lock()
        async with entry.load_lock:
            if entry.vlm is not None:
                return 0.0
            from ..api import load
            t0 = time.perf_counter()
            entry.vlm = await asyncio.to_thread(load, entry.path, **self.load_kwargs)
            entry.last_load_s = time.perf_counter() - t0
            self._gauges()
            return entry.last_load_s

    def keep_alive(self, entry: ModelEntry, keep_alive_s: float | None) -> None:
        self._touch(entry, keep_alive_s)

    def _touch(self, entry: ModelEntry, keep_alive_s: float | None) -> None:
        """Each request sets the model's keep-alive: its own, or the server's default."""
        entry.keep_alive_s = self.config.keep_alive_s if keep_alive_s is None else keep_alive_s
        entry.expires_at = None if entry.keep_alive_s < 0 else time.time() + entry.keep_alive_s

    async def unload(self, entry: ModelEntry) -> bool:
        """Unload now if no request uses the model; else leave it to expire when idle."""
        entry.expires_at = time.time()
        with entry.counter_lock:
            if entry.active:
                return False
            vlm, entry.vlm = entry.vlm, None
        if vlm is not None:
            def drop():
                with vlm.engine.lock:
                    vlm.unload()
            await asyncio.to_thread(drop)
        self._gauges()
        return True

    async def reap(self) -> None:
        now = time.time()
        for entry in list(self.entries.values()):
            if entry.vlm is not None and entry.expires_at is not None and entry.expires_at <= now \
                    and entry.active == 0:
                await self.unload(entry)

    def _gauges(self) -> None:
        self.metrics.set("foveal_models_loaded", len(self.loaded()))

    # ---- admission ------------------------------------------------------------------
    def admit(self, entry: ModelEntry) -> None:
        with entry.counter_lock:
            if entry.active >= self.config.max_queue:
                raise APIError(503, f"model {entry.name!r} is busy: {entry.active} requests are queued "
                                    f"(the limit is {self.config.max_queue}); retry shortly",
                               "queue_full", headers={"Retry-After": str(self.config.retry_after_s)})
            entry.active += 1
            self.metrics.set("foveal_queue_depth", entry.active, model=entry.name)

    def release(self, entry: ModelEntry) -> None:
        with entry.counter_lock:
            entry.active -= 1
            self.metrics.set("foveal_queue_depth", entry.active, model=entry.name)


class Generation:
    """One request's generation in a worker thread, consumed from the event loop chunk by chunk."""

    def __init__(self, registry: ModelRegistry, entry: ModelEntry, messages: list, options: dict):
        self.registry, self.entry = registry, entry
        self.messages, self.options = messages, options
        self.cancel = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t_admit = time.perf_counter()
        self.ttft_s: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_check = time.perf_counter()

    def start(self) -> "Generation":
        """Call after `registry.admit(entry)`; the thread releases the slot when it ends."""
        self._loop = asyncio.get_running_loop()
        vlm = self.entry.vlm
        if vlm is None:   # unloaded between load and admission
            self.registry.release(self.entry)
            raise APIError(503, f"model {self.entry.name!r} was unloaded; retry", "model_unloaded",
                           headers={"Retry-After": "1"})
        threading.Thread(target=self._run, args=(vlm,), name=f"foveal-gen-{self.entry.name}", daemon=True).start()
        return self

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:       # the event loop is gone (server shutting down)
            self.cancel.set()

    def _run(self, vlm) -> None:
        m = self.registry.metrics
        try:
            with vlm.engine.lock:
                if self.cancel.is_set():
                    return
                for chunk in vlm.stream(self.messages, cancel=self.cancel, **self.options):
                    if self.ttft_s is None and chunk.token_ids:
                        self.ttft_s = time.perf_counter() - self.t_admit
                        m.observe("foveal_time_to_first_token_seconds", self.ttft_s, model=self.entry.name)
                    if chunk.done and chunk.stats is not None:
                        s = chunk.stats
                        for stage in ("preprocess", "encode", "prefill", "decode"):
                            m.observe("foveal_stage_duration_seconds", getattr(s, f"{stage}_s"), stage=stage)
                        m.inc("foveal_prompt_tokens_total", s.prompt_tokens, model=self.entry.name)
                        m.inc("foveal_generated_tokens_total", s.generated_tokens, model=self.entry.name)
                    self._put(chunk)
                    if self.cancel.is_set():
                        break
        except (FovealError, APIError) as e:
            self._put(e)
        except Exception as e:   # noqa: BLE001 - a bug: logged here, a bare 500 for the client
            self._put(as_api_error(e))
        finally:
            self.registry.release(self.entry)
            self.registry.keep_alive(self.entry, self.entry.keep_alive_s)
            self._put(_END)

    async def next(self, request=None, poll_s: float = 0.25):
        """The next Chunk, or None at the end; raises the worker's exception. With `request`, the
        client's connection is checked every `poll_s` (tokens may arrive faster than that) and a
        disconnect cancels the generation (raises ClientDisconnected)."""
        while True:
            if request is not None and time.perf_counter() - self._last_check >= poll_s:
                self._last_check = time.perf_counter()
                if await request.is_disconnected():
                    self.cancel.set()
                    raise ClientDisconnected()
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout=poll_s) if request is not None \
                    else await self.queue.get()
            except asyncio.TimeoutError:
                continue
            if item is _END:
                return None
            if isinstance(item, BaseException):
                raise item
            return item

    async def collect(self, request):
        """All chunks (non-streaming responses), watching for a disconnect meanwhile."""
        chunks = []
        try:
            while (chunk := await self.next(request)) is not None:
                chunks.append(chunk)
        finally:
            self.cancel.set()
        return chunks


class WatchedStreamingResponse(StreamingResponse):
    """A StreamingResponse that always listens for the client's disconnect while streaming (Starlette
    only does so for ASGI < 2.4), so the body iterator is cancelled - and with it the generation -
    as soon as the client goes, even between tokens."""

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def stream_then_stop():
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                tg.cancel_scope.cancel()
            tg.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
