"""JSON-constrained decoding: Ollama `format`, OpenAI `response_format` json_object / json_schema.

A `JSONConstraint` wraps one llguidance `LLMatcher` (Microsoft's grammar engine, the one behind
guidance and the llguidance backends of vLLM and llama.cpp) for one request. The engine hands it
each step's logits; it masks every token the grammar forbids, lets the sampler pick among the rest
and advances the grammar with the pick.

Design decisions:
- `format="json"` (and OpenAI `json_object`) means "one JSON object", as in Ollama and OpenAI;
  a dict is a JSON schema, compiled by llguidance (properties/required, enum/const, anyOf/oneOf,
  $ref/$defs, min/max, patterns, formats, ...). A schema llguidance cannot compile - or a keyword
  it does not implement - is a `SamplingError` naming the problem, before any token is generated.
- Whitespace between tokens follows llama.cpp's grammars/json.gbnf (`ws ::= | " " | "\\n" [ \\t]{0,20}`):
  enough for compact or pretty-printed JSON, but never the endless run of newlines a weak model
  falls into when whitespace is unbounded.
- EOS is allowed only where the JSON is complete (the matcher puts EOS in the mask only in an
  accepting state). When the grammar can take nothing more (the closing brace of the top-level
  object), generation stops at once with finish_reason "stop", without waiting for an EOS.
- If max_tokens runs out first, finish_reason is "length" and the text is the incomplete JSON
  generated so far - as in Ollama and OpenAI; clients must check the finish reason. Stop strings
  still apply and can cut the JSON short in the same way.
- The matcher works on token ids of the model's own `tokenizers` tokenizer (built from its
  tokenizer.json string, so no transformers is needed; tests cover byte-level vocabularies with
  and without merges). The `LLTokenizer` is built once per tokenizer and shared by all requests.
- The mask is computed on the CPU after the step's forward pass is launched and before its logits
  are read, and unpacked with numpy (~10 us for 128k tokens). Requests without a constraint never
  touch this module: the engine calls the sampler directly.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import torch

from ..errors import SamplingError

# https://github.com/ggml-org/llama.cpp/blob/master/grammars/json.gbnf
WHITESPACE = r"(?: |\n[ \t]{0,20})?"
ANY_OBJECT = {"type": "object"}
MAX_SCHEMA_CHARS = 100_000

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:     # imported lazily: only constrained requests need it
        raise SamplingError("JSON-constrained output needs the llguidance package: pip install llguidance") \
            from None
    return llguidance


def grammar_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """The llguidance tokenizer for a foveal `Tokenizer` (cached per tokenizer object)."""
    key = (vocab_size, tuple(sorted(eos_ids)))
    cached = _tokenizers.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    llg = _llguidance()
    n_vocab = max(vocab_size, tokenizer.vocab_size)
    try:
        built = llg.LLTokenizer(tokenizer.tok.to_str(), n_vocab=n_vocab, eos_token=sorted(eos_ids) or None)
    except Exception as e:   # noqa: BLE001 - the Rust side raises plain exceptions
        raise SamplingError(f"format (JSON-constrained output) is not available for this model: its tokenizer "
                            f"cannot be used by the grammar engine ({str(e)[:200]})") from None
    _tokenizers[tokenizer] = (key, built)
    return built


def schema_of(format) -> dict:
    """The JSON schema a `format` value asks for: "json" -> any object; a dict -> itself."""
    if isinstance(format, str):
        if format.strip().lower() == "json":
            return dict(ANY_OBJECT)
        raise SamplingError(f"format must be \"json\" or a JSON schema object, got {format[:40]!r}")
    if not isinstance(format, dict):
        raise SamplingError(f"format must be \"json\" or a JSON schema object, got {type(format).__name__}")
    return format


class JSONConstraint:
    """Per-request grammar state: masks logits, advances on each picked token."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size          # logits width (the model's vocabulary)

    @classmethod
    def build(cls, format, tokenizer, vocab_size: int, eos_ids) -> "JSONConstraint":
        """`format`: "json" or a JSON schema dict. Raises SamplingError naming what is wrong."""
        schema = schema_of(format)
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as e:
            raise SamplingError(f"the JSON schema for the output cannot be serialised ({e})") from None
        if len(text) > MAX_SCHEMA_CHARS:
            raise SamplingError(f"the JSON schema for the output is {len(text)} characters; "
                                f"the limit is {MAX_SCHEMA_CHARS}")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_pattern": WHITESPACE})
        except (ValueError, TypeError) as e:
            raise SamplingError(f"invalid JSON schema for the output: {str(e)[:300]}") from None
        matcher = llg.LLMatcher(grammar_tokenizer(tokenizer, vocab_size, eos_ids), grammar, log_level=0)
        if matcher.is_error():
            raise SamplingError(f"the JSON schema for the output cannot be enforced: {matcher.get_error()[:300]}")
        return cls(matcher, vocab_size)

    def allowed(self, device) -> torch.Tensor:
        """(V,) bool: the tokens the grammar accepts next (EOS only where the JSON is complete)."""
        # one bit per token, little-endian within each byte; numpy unpacks 128k tokens in ~10 us
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if bits.size < self.vocab_size:
            bits = np.concatenate([bits, np.zeros(self.vocab_size - bits.size, dtype=np.uint8)])
        bits = bits[:self.vocab_size]
        if self.matcher.is_error() or not bits.any():
            raise SamplingError(f"constrained decoding failed: {self.matcher.get_error()[:300] or 'no token fits'}")
        return torch.from_numpy(bits.view(np.bool_)).to(device, non_blocking=True)

    def pick(self, sampler, logits: torch.Tensor) -> int:
        """Mask logits (V,), let `sampler` choose, advance the grammar with the choice."""
        token = sampler(logits, self.allowed(logits.device))
        if not self.matcher.consume_token(token):
            raise SamplingError(f"constrained decoding refused token {token}: {self.matcher.get_error()[:300]}")
        return token

    @property
    def finished(self) -> bool:
        """True once the JSON is complete and nothing more can follow it."""
        return self.matcher.is_stopped()


def json_constraint(format, tokenizer, vocab_size: int, eos_ids) -> JSONConstraint | None:
    """None for no format ("" or None), else a fresh constraint for one request."""
    if format is None or format == "":
        return None
    return JSONConstraint.build(format, tokenizer, vocab_size, eos_ids)
