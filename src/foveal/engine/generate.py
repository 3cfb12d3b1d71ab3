"""Prefill / decode loop over a static KV cache, with stop conditions and streaming.

Design decisions:
- One `Engine` per loaded model owns the caches: the KV cache, sized for the request (prompt +
  max_tokens, rounded up to a multiple of CACHE_BLOCK) and reused while later requests fit, and
  the image embeddings by content hash (an LRU of IMAGE_CACHE_SIZE images or videos), so that the
  next turn of a chat about the same picture or video neither preprocesses nor encodes it again.
- The engine knows nothing of families: it asks the family's processor for pixels of the images
  it lacks, the model to encode them, and feeds the model embeddings and the positions the
  processor computed (plain 0..T-1, or M-RoPE's (3, T)); a decode step's position is one scalar,
  `next_position + step`, the same for every section.
- Prefix reuse: the engine remembers which token keys (ids, with image positions keyed by the
  image's content hash) its cache holds; a request that starts with the same keys (the next turn
  of a chat) prefills only what is new. At least one token is always prefilled to get logits.
- Prefill computes logits for the last position only; the decode step is one token at a time,
  shape-stable, with no per-token work that grows with the sequence.
- Stop strings are matched on decoded text; streamed text is held back while it could still be
  the beginning of a stop string, so a stop string never leaks to the client.
- `Engine.lock` serialises requests on one model (the server may run several threads).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, PromptError
from ..processing.prompt import StreamDecoder, Tokenizer
from .sampling import Sampler, SamplingOptions
from .thinking import partial_tail

CACHE_BLOCK = 256
IMAGE_CACHE_SIZE = 16


@dataclass
class Stats:
    prompt_tokens: int = 0
    image_tokens: int = 0            # slots of images (videos' are in video_tokens)
    images: int = 0
    videos: int = 0
    video_frames: int = 0            # frames sampled from the videos
    video_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens whose KV came from the previous request
    generated_tokens: int = 0
    preprocess_s: float = 0.0        # image / video decode + pixel preprocessing
    encode_s: float = 0.0            # vision tower + projector
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(self.generated_tokens - 1, 0)   # the first token comes out of prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class Chunk:
    """One streamed piece. The last one has done=True, finish_reason and stats."""
    text: str
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None     # "stop" (EOS or stop string) | "length"
    stats: Stats | None = None
    thinking: str = ""                   # the model's thought, kept out of text (engine/thinking.py)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats
    thinking: str = ""


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, eos_ids: set[int], context_length: int, dtype):
        """Token ids and positions go in on the embedding's device (model.input_device: the CPU when
        split by --gpu-layers); the KV cache of each layer is on that layer's device."""
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = set(eos_ids)
        self.context_length = context_length
        self.dtype = dtype
        self.lock = threading.RLock()
        self._cached_keys: list = []
        self.image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()   # content hash -> (tokens, D)

    def _ensure_cache(self, needed: int) -> None:
        if self.model.cache_len >= needed:
            return
        size = min(-(-needed // CACHE_BLOCK) * CACHE_BLOCK, max(self.context_length, needed))
        self.model.setup_cache(size, self.dtype)
        self._cached_keys = []

    def image_embeds(self, chunks: list, processor, stats: Stats) -> torch.Tensor | None:
        """The prompt's images (models.interface.ImageChunk, in prompt order) -> their embeddings
        (1, image tokens, D), encoding only those the cache lacks (each once, however often it appears)."""
        if not chunks:
            return None
        t0 = time.perf_counter()
        todo = list({c.key: c for c in chunks if c.key not in self.image_cache}.values())
        if todo:
            pixels = processor.pixels(todo)
            t1 = time.perf_counter()
            stats.preprocess_s += t1 - t0
            t0 = t1
            with torch.inference_mode():      # outside the lock, as before: a server encodes beside a decode
                new = self.model.encode(pixels)
            for c, e in zip(todo, new):
                if e.shape[0] != c.n_tokens:
                    raise PromptError(f"{'a video' if c.kind == 'video' else 'an image'} of {c.size[1]}x{c.size[0]} "
                                      f"px was given {c.n_tokens} token slots but encodes to {e.shape[0]} rows")
                self.image_cache[c.key] = e
        embeds = torch.cat([self.image_cache[c.key] for c in chunks])[None]
        for c in chunks:
            self.image_cache.move_to_end(c.key)
        while len(self.image_cache) > IMAGE_CACHE_SIZE:
            self.image_cache.popitem(last=False)
        stats.encode_s += time.perf_counter() - t0
        return embeds

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One decode step on a scratch cache, then drop it: a compiled decode step compiles here. Position
        2, not 0 or 1: torch.compile specialises on those values and would compile again."""
        with self.lock:
            self._ensure_cache(3)
            dev = self.model.input_device
            self.model.decode(torch.zeros((1, 1), dtype=torch.long, device=dev), torch.tensor([2], device=dev), 3)
            self.reset()

    def reset(self) -> None:
        """Drop the KV cache (the image embeddings stay: `unload` drops those too)."""
        self.model.drop_cache()
        self._cached_keys = []

    def unload(self) -> None:
        self.reset()
        self.image_cache.clear()

    @torch.inference_mode()
    def prompt_logits(self, input_ids: list[int], image_mask: list[bool], image_embeds,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (T, V) at every prompt position, computed from scratch (evaluation, parity checks);
        positions: the family's (T,) or (3, T) RoPE positions (None: 0..T-1)."""
        with self.lock:
            self._ensure_cache(len(input_ids))
            self._cached_keys = []
            dev = self.model.input_device
            ids = torch.tensor([input_ids], device=dev)
            mask = torch.tensor([image_mask], device=dev)
            embeds = self.model.embed(ids, mask if any(image_mask) else None, image_embeds)
            pos = torch.arange(len(input_ids), device=dev) if positions is None else positions.to(dev)
            return self.model(embeds, pos, start=0)[0]

    @torch.inference_mode()
    def stream(self, input_ids: list[int], image_mask: list[bool], image_embeds: torch.Tensor | None,
               image_keys: list, opts: SamplingOptions, stats: Stats, cancel: threading.Event | None = None,
               constraint=None, positions: torch.Tensor | None = None, next_position: int | None = None):
        """Yield Chunks for one prompt. image_keys: (hashable key, token count) per image, in prompt order.
        constraint: a `constrain.JSONConstraint` (masks each pick; stops when its grammar is complete).
        positions: the prompt's RoPE positions, (T,) or (3, T) (None: 0..T-1); next_position: the first
        generated token's (None: T). Cache slots are always 0..T-1, then T, T+1, ..."""
        t_start = time.perf_counter()
        n_prompt = len(input_ids)
        if n_prompt >= self.context_length:
            raise ContextLengthError(n_prompt + 1, self.context_length)
        max_new = min(opts.max_tokens, self.context_length - n_prompt)
        stats.prompt_tokens = n_prompt
        stats.image_tokens = sum(image_mask) - stats.video_tokens
        keys = _token_keys(input_ids, image_mask, image_keys)

        with self.lock:
            self._ensure_cache(n_prompt + max_new)
            reuse = _common_prefix(self._cached_keys, keys)
            reuse = min(reuse, n_prompt - 1)
            stats.cached_tokens = reuse
            dev = self.model.input_device
            ids = torch.tensor([input_ids], device=dev)
            mask = torch.tensor([image_mask], device=dev)
            embeds = self.model.embed(ids, mask if any(image_mask) else None, image_embeds)
            self._cached_keys = []          # invalid until prefill completes
            t0 = time.perf_counter()
            pos = (torch.arange(reuse, n_prompt, device=dev) if positions is None
                   else positions[..., reuse:].to(dev))
            logits = self.model(embeds[:, reuse:], pos, last_only=True, start=reuse)[0, -1]
            first = n_prompt if next_position is None else next_position
            stats.prefill_s = time.perf_counter() - t0
            self._cached_keys = keys
            sampler = Sampler(opts, logits.shape[-1], logits.device, input_ids if opts.repetition_penalty != 1 else None)
            decoder = StreamDecoder(self.tokenizer)
            out_ids: list[int] = []
            pending: list[int] = []         # ids whose text has not been sent yet
            text, sent = "", 0
            finish = "length"
            hold = max((len(s) for s in opts.stop), default=0)
            pick = sampler if constraint is None else (lambda lg: constraint.pick(sampler, lg))
            t_decode = time.perf_counter()
            token = pick(logits)
            for step in range(max_new):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if token in self.eos_ids:
                    finish = "stop"
                    break
                out_ids.append(token)
                pending.append(token)
                text += decoder.push(token)
                if opts.stop:
                    cut = _find_stop(text, opts.stop, max(0, sent - hold))
                    if cut is not None:
                        text = text[:cut]
                        finish = "stop"
                        break
                safe = len(text) - partial_tail(text, opts.stop) if opts.stop else len(text)
                if safe > sent:
                    yield Chunk(text[sent:safe], pending)
                    sent, pending = safe, []
                if constraint is not None and constraint.finished:
                    finish = "stop"
                    break
                if step == max_new - 1:
                    break
                pos = torch.tensor([first + step], device=dev)
                logits = self.model.decode(torch.tensor([[token]], device=dev), pos, n_prompt + step + 1)
                self._cached_keys.append(token)     # only now is its KV in the cache (not so for the last token)
                token = pick(logits)
            if finish != "stop" or not opts.stop:
                text += decoder.flush()
                if opts.stop and (cut := _find_stop(text, opts.stop, 0)) is not None:
                    text, finish = text[:cut], "stop"
            stats.decode_s = time.perf_counter() - t_decode
            stats.generated_tokens = len(out_ids)
            stats.total_s += time.perf_counter() - t_start
            if finish == "cancelled":
                self._cached_keys = []
                finish = "stop"
            yield Chunk(text[sent:], pending, done=True, finish_reason=finish, stats=stats)


def _token_keys(ids, mask, image_keys):
    """Cache keys: token ids, and (image key, row) at image positions. image_keys: (key, token count) per
    image in prompt order (counts differ between images on LLaVA-NeXT)."""
    rows = iter([(key, r) for key, n in image_keys for r in range(n)])
    return [next(rows, (None, j)) if m else t for j, (t, m) in enumerate(zip(ids, mask))]


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best


