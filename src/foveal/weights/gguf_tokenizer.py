"""tokenizer.ggml.* metadata <-> a `tokenizers` tokenizer.json that encodes the same.

`vocab_from_metadata` reads the GGUF keys into a `GGUFVocab`, `tokenizer_from_vocab` builds the
tokenizer.json from it; `vocab_from_tokenizer` is the reverse, for writing.

Design decisions
- Two llama.cpp vocabularies are handled, the ones LLaVA-family LMs use. `llama`
  (SentencePiece BPE: `▁`-spelled pieces, scores, token types, `<0xXX>` byte pieces) becomes a
  BPE model with byte fallback behind transformers' legacy Llama normalizer (Prepend("▁") +
  Replace(" ", "▁")), which prefixes `▁` even to text that starts with a space, as SentencePiece
  and llama.cpp do. `gpt2` (byte-level BPE with merges) becomes a BPE model behind the split regex that
  `tokenizer.ggml.pre` names, then ByteLevel.
- SentencePiece GGUFs carry scores, not merges. The merges are rebuilt from the scores: every
  split of a NORMAL piece into two NORMAL pieces, best score first (transformers'
  `generate_merges` order, which is how HF converted these tokenizers in the first place).
  A file that also has `tokenizer.ggml.merges` (foveal writes them for `llama` too; llama.cpp
  ignores them there) is read with those, exact for any BPE tokenizer.
- On write, a SentencePiece piece's score is minus the rank of the first merge that makes it,
  so llama.cpp's "best-scoring bigram first" picks merges in BPE's order.
- The split regex is the one thing a GGUF names rather than stores: `tokenizer.ggml.pre` is a
  key into llama.cpp's table. Reading maps the name to the tokenizer.json regex, llama.cpp's
  "default" included, and refuses an unknown name: splitting like GPT-2 instead gives wrong ids
  without a sign, so that fallback is only taken when asked for (`pre_fallback`, or the
  FOVEAL_GGUF_PRE_FALLBACK=1 environment variable for `foveal.load`). Writing maps the regex
  back to a name and refuses one llama.cpp would not reproduce.
- Every GGUF token keeps its id (llama.cpp's `[PADn]` fillers included), so ids stay
  contiguous; CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens,
  both matched whole and unnormalized, as llama.cpp matches them.
- Qwen2's tokenizer NFC-normalizes its input; llama.cpp does not. We follow the HF original.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from foveal.errors import UnsupportedModelError, WeightsError
from foveal.weights.gguf import meta_bool, meta_str

log = logging.getLogger(__name__)

# Split regexes exactly as the models' tokenizer.json spell them.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's regex lists for pre-tokenizers that apply several in turn (llama-vocab.cpp).
_GPT2_NO_TRAILING_WS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_NO_TRAILING_WS, r"\p{N}+", r"[0-9][0-9][0-9]")
_STARCODER_SPLITS = (r"\p{N}", _GPT2_NO_TRAILING_WS)
_FALCON_SPLITS = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_NO_TRAILING_WS, r"[0-9][0-9][0-9]")
_CJK = r"[一-龥ࠀ-一가-퟿]+"
# deepseek-llm's letters (Latin, Greek, Cyrillic, ...) as ranges, copied from llama-vocab.cpp
_DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")


@dataclass(frozen=True)
class _PreTokenizer:
    splits: tuple[str, ...]  # applied in turn, each on the pieces of the previous one
    ignore_merges: bool = False  # a word that is itself a token is kept whole (Llama 3)
    nfc: bool = False  # the HF original NFC-normalizes (Qwen2)


_LLAMA3 = _PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True)
_QWEN2 = _PreTokenizer((QWEN2_SPLIT,))
_GPT2 = _PreTokenizer((GPT2_SPLIT,))
# tokenizer.ggml.pre name -> what it does (names as llama.cpp's llama-vocab.cpp accepts them).
PRE_TOKENIZERS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _PreTokenizer((LLAMA3_SPLIT,))),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _PreTokenizer((QWEN2_SPLIT,), nfc=True)),
    **dict.fromkeys(["kormo", "f2llmv2", "megrez", "stablelm2"], _QWEN2),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion"], _GPT2),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "minimax-m2"], _PreTokenizer((GPT4O_SPLIT,))),
    "tekken": _PreTokenizer((TEKKEN_SPLIT,), ignore_merges=True),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b"], _PreTokenizer(_STARCODER_SPLITS)),
    "falcon": _PreTokenizer(_FALCON_SPLITS),
    "deepseek-llm": _PreTokenizer(_DEEPSEEK_LLM_SPLITS),
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER_SPLITS),
    "qwen35": _PreTokenizer((QWEN35_SPLIT,)),
    "default": _PreTokenizer(_DEFAULT_SPLITS),
}
# tokenizer.json split regex -> the name written to tokenizer.ggml.pre.
PRE_NAME_BY_SPLIT = {
    GPT2_SPLIT: "gpt-2",
    LLAMA3_SPLIT: "llama-bpe",
    QWEN2_SPLIT: "qwen2",
    GPT4O_SPLIT: "gpt-4o",
    TEKKEN_SPLIT: "tekken",
}

PRE_FALLBACK_ENV = "FOVEAL_GGUF_PRE_FALLBACK"  # "1": split an unknown tokenizer.ggml.pre like GPT-2

SPIECE_UNDERLINE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_PAD_FILLER = "[PAD{}]"  # llama.cpp's name for ids the tokenizer does not use


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it (tokenizer.ggml.* and tokenizer.chat_template)."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: Any = None  # str, or a list of {"name", "template"}


# --- tokenizer.ggml.* metadata -> GGUFVocab --------------------------------------------
def vocab_from_metadata(meta: dict[str, Any], n_rows: int) -> GGUFVocab:
    K = Keys.Tokenizer
    model = meta_str(meta, K.MODEL)
    tokens = meta.get(K.LIST)
    if not isinstance(model, str) or not isinstance(tokens, list):
        raise WeightsError("the GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if len(tokens) > n_rows:
        raise WeightsError(f"the GGUF lists {len(tokens)} tokens but embeds only {n_rows}")
    n = len(tokens)

    def array(key: str, kind: str, default: Any) -> list[Any]:
        value = meta.get(key)
        if value is None:
            return [default] * n
        if not isinstance(value, np.ndarray) or value.dtype.kind not in kind or len(value) != n:
            raise WeightsError(f"GGUF metadata {key} is not a numeric array of {n} entries")
        return value.tolist()

    types = array(K.TOKEN_TYPE, "iu", int(TokenType.NORMAL))
    scores = array(K.SCORES, "fiu", 0.0) if K.SCORES in meta else None
    merges = meta.get(K.MERGES)
    if isinstance(merges, np.ndarray) and merges.size == 0:
        merges = []  # how an empty array reads back
    if merges is not None and (not isinstance(merges, list)):
        raise WeightsError("GGUF metadata tokenizer.ggml.merges is not a list of strings")
    # ids the tokenizer lacks but the embedding has: llama.cpp's unused fillers
    tokens = tokens + [f"[PAD{i}]" for i in range(n, n_rows)]
    types += [int(TokenType.UNUSED)] * (n_rows - n)
    if scores is not None:
        scores += [0.0] * (n_rows - n)

    sentencepiece = model == "llama"
    defaults = {K.BOS_ID: 1, K.EOS_ID: 2, K.UNK_ID: 0} if sentencepiece else {}

    def token_id(key: str) -> int | None:
        value = meta.get(key, defaults.get(key))
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_rows:
            log.warning("ignoring out-of-range %s = %r", key, value)
            return None
        return value

    pre = meta_str(meta, K.PRE)
    # llama.cpp's defaults: BOS for SentencePiece and for Llama-3-style BPE
    add_bos_default = sentencepiece or PRE_TOKENIZERS.get(pre or "") is PRE_TOKENIZERS["llama-bpe"]
    add_bos, add_eos = meta_bool(meta, K.ADD_BOS, add_bos_default), meta_bool(meta, K.ADD_EOS, False)
    add_prefix = meta_bool(meta, K.ADD_PREFIX)
    return GGUFVocab(
        model=model, pre=pre, tokens=tokens, token_types=types, scores=scores, merges=merges,
        bos_id=token_id(K.BOS_ID), eos_id=token_id(K.EOS_ID), unk_id=token_id(K.UNK_ID),
        pad_id=token_id(K.PAD_ID), add_bos=bool(add_bos), add_eos=bool(add_eos),
        add_space_prefix=bool(add_prefix) if add_prefix is not None else None,
        chat_template=_chat_template(meta),
    )


def _chat_template(meta: dict[str, Any]) -> Any:
    default = meta.get(Keys.Tokenizer.CHAT_TEMPLATE)
    names = meta.get(Keys.Tokenizer.CHAT_TEMPLATES)
    named = [
        {"name": name, "template": meta[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)]}
        for name in (names if isinstance(names, list) else [])
        if isinstance(meta.get(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)), str)
    ]
    if not named:
        return default if isinstance(default, str) else None
    return ([{"name": "default", "template": default}] if isinstance(default, str) else []) + named


def add_image_token(vocab: GGUFVocab, tokenizer_json: str) -> tuple[int, str]:
    """The `<image>` token's id. GGUFs converted from the original LLaVA repo have none (llama.cpp
    splices embeddings in directly): then `<image>` becomes a special token one past the
    vocabulary, an id the model must mask before the embedding lookup."""
    if "<image>" in vocab.tokens:
        return vocab.tokens.index("<image>"), tokenizer_json
    image_id = len(vocab.tokens)
    spec = json.loads(tokenizer_json)
    spec["added_tokens"].append({
        "id": image_id, "content": "<image>", "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": True,
    })
    tokenizer_json = json.dumps(spec, ensure_ascii=False)
    Tokenizer.from_str(tokenizer_json)  # still a valid tokenizer
    return image_id, tokenizer_json


# --- GGUF -> tokenizer.json -------------------------------------------------------------
def tokenizer_from_vocab(vocab: GGUFVocab, *, pre_fallback: bool | None = None) -> tuple[str, dict[str, Any]]:
    """Build (tokenizer.json text, tokenizer_config dict) from a GGUF vocabulary.
    `pre_fallback`: split text like GPT-2 when tokenizer.ggml.pre names a pre-tokenizer foveal
    does not know, instead of refusing (None: as the FOVEAL_GGUF_PRE_FALLBACK variable says)."""
    n = len(vocab.tokens)
    if len(vocab.token_types) != n or (vocab.scores is not None and len(vocab.scores) != n):
        raise WeightsError("tokenizer.ggml.tokens, token_type and scores differ in length")
    ids: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        ids.setdefault(token, i)  # a repeated piece keeps its first id, as llama.cpp does
    try:
        if vocab.model == "llama":
            tokenizer = _sentencepiece_tokenizer(vocab, ids)
        elif vocab.model == "gpt2":
            if pre_fallback is None:
                pre_fallback = os.environ.get(PRE_FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes")
            tokenizer = _byte_level_tokenizer(vocab, ids, pre_fallback)
        else:
            raise UnsupportedModelError(
                f"GGUF tokenizer model {vocab.model!r} is not supported (foveal reads 'llama' "
                f"SentencePiece and 'gpt2' byte-level BPE vocabularies)"
            )
        _add_gguf_added_tokens(tokenizer, vocab)
        _set_post_processor(tokenizer, vocab)
        tokenizer_json = tokenizer.to_str()
    except (UnsupportedModelError, WeightsError):
        raise
    except Exception as e:  # the tokenizers library reports bad vocabularies as bare Exception
        raise WeightsError(f"the GGUF vocabulary does not form a valid tokenizer: {e}") from e

    def token(i: int | None) -> str | None:
        return vocab.tokens[i] if i is not None and 0 <= i < n else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(vocab.bos_id),
        "eos_token": token(vocab.eos_id),
        "unk_token": token(vocab.unk_id),
        "pad_token": token(vocab.pad_id),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    return tokenizer_json, config


def _sentencepiece_tokenizer(vocab: GGUFVocab, ids: dict[str, int]) -> Tokenizer:
    if vocab.merges is not None:
        merges = _parse_merges(vocab.merges)
    elif vocab.scores is not None:
        merges = merges_from_scores(vocab.tokens, vocab.token_types, vocab.scores)
    else:
        raise WeightsError("a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores")
    unk = next((t for t, k in zip(vocab.tokens, vocab.token_types) if k == TokenType.UNKNOWN), None)
    tokenizer = Tokenizer(
        models.BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    add_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
    # transformers' legacy Llama form, not a Metaspace pre-tokenizer: Metaspace skips the `▁`
    # when the text already starts with a space (" Hello" -> "▁Hello"), SentencePiece and
    # llama.cpp always add it ("▁▁Hello"), and after every added token too, as this does
    # (llama.cpp's `is_prev_special`, llama-vocab.cpp).
    prepend = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(
    tokens: Sequence[str], token_types: Sequence[int], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores: each split of a NORMAL piece into two NORMAL
    pieces, ordered like transformers' `generate_merges` (score, then longer left, longer right)."""
    normal: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, token_types)):
        if kind == TokenType.NORMAL:
            normal.setdefault(token, i)
    merges: list[tuple[str, str, float]] = []
    for token, i in normal.items():
        local = [
            (token[:k], token[k:], float(scores[i]))
            for k in range(1, len(token))
            if token[:k] in normal and token[k:] in normal
        ]
        local.sort(key=lambda m: (normal[m[0]], normal[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level_tokenizer(vocab: GGUFVocab, ids: dict[str, int], pre_fallback: bool) -> Tokenizer:
    if vocab.merges is None:
        raise WeightsError("a byte-level (gpt2) GGUF vocabulary needs tokenizer.ggml.merges")
    pre = PRE_TOKENIZERS.get(vocab.pre or "default")
    if pre is None and not pre_fallback:
        raise UnsupportedModelError(
            f"the GGUF's tokenizer.ggml.pre {vocab.pre!r} names a pre-tokenizer foveal does not know, "
            f"so its text would be split into the wrong tokens (supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}); set {PRE_FALLBACK_ENV}=1 to split it like GPT-2 "
            f"anyway, with token ids that may differ from the model's own"
        )
    if pre is None:
        log.warning("unknown tokenizer.ggml.pre %r: splitting text like GPT-2, as asked; token ids "
                    "may differ from the model's own", vocab.pre)
        pre = _GPT2
    tokenizer = Tokenizer(
        models.BPE(
            vocab=ids, merges=_parse_merges(vocab.merges), ignore_merges=pre.ignore_merges,
            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
        )
    )
    if pre.nfc:
        tokenizer.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in pre.splits]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise WeightsError(f"tokenizer.ggml.merges holds a malformed merge {merge!r}")
        pairs.append((left, right))
    return pairs


def _add_gguf_added_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    special, plain = [], []
    for token, kind in zip(vocab.tokens, vocab.token_types):
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == TokenType.USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if plain:
        tokenizer.add_tokens(plain)


def _set_post_processor(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    steps = []
    if vocab.model == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and _valid_id(vocab, vocab.bos_id) else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos and _valid_id(vocab, vocab.eos_id) else None
    if bos or eos:
        # HF's layout for Llama: "<s> $A" and, for pairs, "<s> $A <s> $B" (type ids 0 then 1)
        def piece(seq: str, type_id: int) -> list[str]:
            return [f"{bos}:{type_id}"] * bool(bos) + [f"{seq}:{type_id}"] + [f"{eos}:{type_id}"] * bool(eos)

        special = {bos: vocab.bos_id, eos: vocab.eos_id}
        special.pop(None, None)
        steps.append(processors.TemplateProcessing(
            single=piece("$A", 0), pair=piece("$A", 0) + piece("$B", 1),
            special_tokens=list(special.items()),
        ))
    if len(steps) == 1:
        tokenizer.post_processor = steps[0]
    elif steps:
        tokenizer.post_processor = processors.Sequence(steps)


def _valid_id(vocab: GGUFVocab, i: int | None) -> bool:
    return i is not None and 0 <= i < len(vocab.tokens)


# --- tokenizer.json -> GGUF -------------------------------------------------------------
def vocab_from_tokenizer(
    tokenizer_json: str, tokenizer_config: dict[str, Any], vocab_size: int, *, placeholder: int | None = None
) -> GGUFVocab:
    """The llama.cpp vocabulary for an HF tokenizer, padded to the model's `vocab_size` rows.
    `placeholder` is an image-token id past the embedding (see gguf_read), left out of the file."""
    try:
        spec = json.loads(tokenizer_json)
        model = spec["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"tokenizer.json is not a tokenizers file: {e}") from e
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"a {model.get('type')} tokenizer cannot be written as a llama.cpp vocabulary "
            f"(only BPE: SentencePiece-style with byte fallback, or byte-level)"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or [] if int(a["id"]) != placeholder}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise WeightsError(
            f"the tokenizer has token id {max(by_id)} but the model embeds only {vocab_size} tokens"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    unk = model.get("unk_token") or _special(tokenizer_config, "unk_token")
    tokens = [by_id.get(i, _PAD_FILLER.format(i)) for i in range(vocab_size)]
    types = []
    for i, token in enumerate(tokens):
        if i not in by_id:
            types.append(TokenType.UNUSED)
        elif sentencepiece and token == unk:
            types.append(TokenType.UNKNOWN)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_PIECE.fullmatch(token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)

    merges = [_merge_pair(m) for m in model.get("merges") or []]
    representable = all(" " not in a and " " not in b for a, b in merges)
    template_bos, template_eos = _template_specials(spec.get("post_processor"))
    first_id = {}
    for i, token in enumerate(tokens):
        first_id.setdefault(token, i)

    def special_id(key: str, fallback: str | None) -> int | None:
        token = _special(tokenizer_config, key) or fallback
        return first_id.get(token) if token is not None else None

    add_bos = tokenizer_config.get("add_bos_token")
    add_eos = tokenizer_config.get("add_eos_token")
    vocab = GGUFVocab(
        model="llama" if sentencepiece else "gpt2",
        pre=None,
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=None,
        merges=[f"{a} {b}" for a, b in merges] if representable else None,
        bos_id=special_id("bos_token", template_bos),
        eos_id=special_id("eos_token", template_eos),
        unk_id=first_id.get(unk) if unk else None,
        pad_id=special_id("pad_token", None),
        add_bos=add_bos if isinstance(add_bos, bool) else template_bos is not None,
        add_eos=add_eos if isinstance(add_eos, bool) else template_eos is not None,
        add_space_prefix=None,
        chat_template=tokenizer_config.get("chat_template"),
    )
    if sentencepiece:
        vocab.add_space_prefix = _sentencepiece_prefix(spec)
        vocab.scores = _scores_from_merges(tokens, types, merges)
        if not representable:
            log.warning("merges with spaces cannot be stored; the reader will rebuild them from scores")
    else:
        if not representable:
            raise UnsupportedModelError("byte-level merges containing spaces cannot be stored in GGUF")
        vocab.pre = _pre_name(spec)
    return vocab


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):  # tokenizers < 0.20 wrote "a b"
        left, _, right = merge.partition(" ")
        return left, right
    left, right = merge
    return str(left), str(right)


def _special(tokenizer_config: dict[str, Any], key: str) -> str | None:
    value = tokenizer_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_specials(post: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(leading, trailing) special token of a TemplateProcessing post-processor, if any."""
    if not post:
        return None, None
    if post.get("type") == "Sequence":
        for step in post.get("processors") or []:
            found = _template_specials(step)
            if found != (None, None):
                return found
        return None, None
    if post.get("type") != "TemplateProcessing":
        return None, None
    single = post.get("single") or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    return first, last


def _sentencepiece_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends `▁` (llama.cpp's add_space_prefix)."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace":
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = {s.get("type"): s for s in steps}
    if "Replace" in kinds:  # transformers' legacy Llama form: Prepend("▁") + Replace(" ", "▁")
        return kinds.get("Prepend", {}).get("prepend") == SPIECE_UNDERLINE
    raise UnsupportedModelError(
        "a byte-fallback BPE tokenizer without SentencePiece's `▁` spaces cannot be written as "
        "a llama.cpp vocabulary"
    )


def _scores_from_merges(
    tokens: list[str], types: list[TokenType], merges: list[tuple[str, str]]
) -> list[float]:
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    scores = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind != TokenType.NORMAL:
            scores.append(0.0)
        elif token in first_rank:
            scores.append(-float(first_rank[token]))
        else:  # a piece no merge makes (single characters): below every merge
            scores.append(-float(len(merges) + i))
    return scores


def _pre_name(spec: dict[str, Any]) -> str:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    regex = None
    if len(byte_level) == 1 and byte_level[0].get("use_regex", True) and not splits:
        regex = GPT2_SPLIT
    elif len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
        regex = (splits[0].get("pattern") or {}).get("Regex")
    name = PRE_NAME_BY_SPLIT.get(regex) if regex else None
    if name is None:
        raise UnsupportedModelError(
            f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp "
            f"equivalent; supported split regexes: {', '.join(PRE_NAME_BY_SPLIT.values())}"
        )
    norm = (spec.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):
        log.warning("llama.cpp does not apply the tokenizer's %s normalizer", norm)
    return name
