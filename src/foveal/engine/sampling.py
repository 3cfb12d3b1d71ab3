"""Sampling options and the logits -> next-token step.

The order and arithmetic follow transformers' logits processors (generation/logits_process.py):
repetition penalty, then temperature, top-k, top-p, min-p, then a draw from the softmax.
temperature 0 means greedy (argmax), as in Ollama and llama.cpp.

Design decisions:
- Options are validated once, with messages naming the option and its allowed range.
- The repetition penalty uses a per-request "seen" mask over the vocabulary, updated with each
  new token: the cost per step does not grow with the sequence length.
- A seeded torch.Generator per request makes sampled runs reproducible and independent of other
  requests running in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..errors import SamplingError


@dataclass
class SamplingOptions:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1: off
    min_p: float = 0.0             # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # the request's image-token budget (llama.cpp's --image-min-tokens / --image-max-tokens): each
    # image of a dynamic-resolution model is resized to take between these many tokens; a model
    # whose images take a fixed count refuses a budget it cannot keep
    min_image_tokens: int | None = None
    max_image_tokens: int | None = None

    MAX_STOP_STRINGS = 16

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise SamplingError(f"unknown generation option(s): {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
        opts = cls(**{k: v for k, v in kwargs.items() if v is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        def number(name, lo=None, hi=None, lo_open=False, integer=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
                raise SamplingError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
            if v != v or v in (float("inf"), float("-inf")):
                raise SamplingError(f"{name} must be finite, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise SamplingError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise SamplingError(f"{name} must be <= {hi}, got {v}")
        number("max_tokens", 1, integer=True)
        number("temperature", 0, 100)
        number("top_k", 0, integer=True)
        number("top_p", 0, 1, lo_open=True)
        number("min_p", 0, 1)
        number("repetition_penalty", 0, 100, lo_open=True)
        if self.seed is not None:
            number("seed", integer=True)
            self.seed = self.seed % (2 ** 63)        # torch wants a non-negative 64-bit seed
        for name in ("min_image_tokens", "max_image_tokens"):
            if getattr(self, name) is not None:
                number(name, 1, integer=True)
        if self.min_image_tokens is not None and self.max_image_tokens is not None \
                and self.min_image_tokens > self.max_image_tokens:
            raise SamplingError(f"min_image_tokens ({self.min_image_tokens}) is above max_image_tokens "
                                f"({self.max_image_tokens})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingError("stop must be a string or a list of strings")
        self.stop = [s for s in self.stop if s]
        if len(self.stop) > self.MAX_STOP_STRINGS:
            raise SamplingError(f"at most {self.MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")

    @property
    def image_budget(self) -> tuple[int | None, int | None] | None:
        """(min, max) image tokens, None where neither is set."""
        if self.min_image_tokens is None and self.max_image_tokens is None:
            return None
        return self.min_image_tokens, self.max_image_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Picks next tokens for one request."""

    def __init__(self, opts: SamplingOptions, vocab_size: int, device, prompt_ids: list[int] | None = None):
        self.opts = opts
        self.generator = None
        if not opts.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(opts.seed if opts.seed is not None else torch.seed() % (2 ** 63))
        self.seen = None
        if opts.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [i for i in (prompt_ids or []) if 0 <= i < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, device=device)] = True

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """logits (V,) float -> next token id; `allowed` (V,) bool, from a constraint, masks the rest."""
        logits = logits.float()
        o = self.opts
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * o.repetition_penalty, logits / o.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if o.greedy:
            token = int(logits.argmax())
        else:
            token = self._sample(logits)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def _sample(self, logits: torch.Tensor) -> int:
        o = self.opts
        logits = logits / o.temperature
        if o.top_k > 0 and o.top_k < logits.shape[-1]:
            kth = torch.topk(logits, o.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if o.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= (1 - o.top_p)
            remove[-1] = False
            logits = logits.masked_fill(remove.scatter(0, sorted_idx, remove), float("-inf"))
        if o.min_p > 0:
            probs = logits.softmax(-1)
            remove = probs < o.min_p * probs.max()
            remove[probs.argmax()] = False
            logits = logits.masked_fill(remove, float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
