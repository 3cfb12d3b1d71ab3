"""Pieces both APIs share: server state, starting a generation, options validation, timestamps."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine.sampling import SamplingOptions
from ..errors import SamplingError
from .config import ServerConfig
from .errors import APIError
from .metrics import Metrics
from .models import ClientDisconnected, Generation, ModelEntry, ModelRegistry


@dataclass
class ServerState:
    config: ServerConfig
    registry: ModelRegistry
    metrics: Metrics
    started_at: float


def state_of(request) -> ServerState:
    return request.app.state.foveal


def rfc3339_now() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}Z"


def validate_options(options: dict, rename: dict[str, str] | None = None) -> None:
    """Check sampling options now (before queueing), naming them as the client did."""
    try:
        SamplingOptions.from_kwargs(**options)
    except SamplingError as e:
        message = str(e)
        for ours, theirs in (rename or {}).items():
            message = message.replace(ours, theirs)
        raise APIError(400, message, "sampling_error") from None


async def start_generation(request, entry: ModelEntry, messages: list, options: dict):
    """Admit (or 503), start the worker, and wait for the first chunk so that errors found while
    preparing the prompt (bad image, context too long) still become a 4xx status, not a stream."""
    st = state_of(request)
    st.registry.admit(entry)
    gen = Generation(st.registry, entry, messages, options).start()
    try:
        first = await gen.next(request)
    except BaseException:
        gen.cancel.set()
        raise
    return gen, first


async def rest_of(gen: Generation, request):
    """The chunks after the first, until done; stops the generation if the consumer goes away."""
    try:
        while (chunk := await gen.next()) is not None:
            yield chunk
    finally:
        gen.cancel.set()




__all__ = ["ServerState", "state_of", "rfc3339_now", "validate_options", "start_generation", "rest_of",
           "ClientDisconnected"]
