"""foveal's GGUF tokenizer on real vocabularies, against llama.cpp's own tokenizer tests.

The vocab-only GGUFs and their `.inp` / `.out` files come from llama.cpp's `models/`
(see data/vocab/README.md). The inputs and expected ids are read as llama.cpp's
`tests/test-tokenizer-0.cpp` reads them: inputs separated by a `__ggml_vocab_test__` line,
one line of space-separated ids per input, encoded without special tokens (no BOS). The
tokenizer is built the way `read_gguf` builds it (`vocab_from_metadata` then
`tokenizer_from_vocab`); a vocab-only file has no tensors, so the embedding's row count is
the token count.

FOVEAL_LLAMA_CPP_VOCAB_DIR=<llama.cpp>/models adds every vocab of that folder whose
tokenizer model foveal reads (llama-bpe, gpt-2, starcoder, ... are left out of data/ to keep
it small).
"""

import logging
import lzma
import os
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, pre_tokenizers

from foveal.errors import UnsupportedModelError
from foveal.weights.gguf import GGUFFile
from foveal.weights.gguf_tokenizer import (PRE_FALLBACK_ENV, PRE_TOKENIZERS, GGUFVocab,
                                           tokenizer_from_vocab, vocab_from_metadata)

VOCAB_DIR = Path(__file__).resolve().parent / "data" / "vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"

# (test name, vocab file, tokenizer.ggml.pre to read it with: None keeps the file's)
CASES = [
    ("llama-spm", "ggml-vocab-llama-spm.gguf", None),  # Llama 2 / Vicuna: every LLaVA-1.5 GGUF
    ("phi-3", "ggml-vocab-phi-3.gguf", None),
    ("deepseek-coder", "ggml-vocab-deepseek-coder.gguf", None),
    ("deepseek-llm", "ggml-vocab-deepseek-llm.gguf", None),
    ("falcon", "ggml-vocab-falcon.gguf", None),
    ("qwen2", "ggml-vocab-qwen2.gguf", None),
    # llama.cpp's qwen35 vocab is the qwen2 one under another tokenizer.ggml.pre
    ("qwen35", "ggml-vocab-qwen2.gguf", "qwen35"),
]


def _extra_cases() -> list[tuple[str, str, None]]:
    folder = os.environ.get("FOVEAL_LLAMA_CPP_VOCAB_DIR")
    if not folder:
        return []
    names = {name for name, _, _ in CASES}
    return [(p.name.removeprefix("ggml-vocab-").removesuffix(".gguf"), str(p), None)
            for p in sorted(Path(folder).glob("ggml-vocab-*.gguf"))
            if p.with_name(p.name + ".inp").exists()
            and p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") not in names]


def llama_cpp_tests(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    raw = inp.read_text(encoding="utf-8")
    inputs = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):
        inputs.pop()  # llama.cpp's loop stops at the end of the last separator
    lines = out.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(inputs) == len(lines), f"{inp.name} and {out.name} hold different numbers of tests"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines)]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """Vocab file name -> the file on disk (data/vocab keeps them xz-compressed)."""
    folder = tmp_path_factory.mktemp("vocab")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if os.path.isabs(name):
            return Path(name)
        if name not in cache:
            cache[name] = folder / name
            cache[name].write_bytes(lzma.decompress((VOCAB_DIR / f"{name}.xz").read_bytes()))
        return cache[name]

    return get


def read_vocab(path: Path, pre: str | None = None) -> GGUFVocab:
    with GGUFFile(path) as gguf:
        meta = gguf.metadata
    vocab = vocab_from_metadata(meta, len(meta["tokenizer.ggml.tokens"]))
    if pre is not None:
        vocab.pre = pre
    return vocab


def build(vocab: GGUFVocab, **options) -> Tokenizer:
    tokenizer_json, _ = tokenizer_from_vocab(vocab, **options)
    return Tokenizer.from_str(tokenizer_json)


ALL_CASES = CASES + _extra_cases()


@pytest.mark.parametrize("name, file, pre", ALL_CASES, ids=[name for name, _, _ in ALL_CASES])
def test_gguf_vocab_encodes_llama_cpps_test_inputs_to_its_ids(name, file, pre, gguf_files):
    path = gguf_files(file)
    tests_dir = path.parent if os.path.isabs(file) else VOCAB_DIR
    stem = f"ggml-vocab-{name}.gguf"
    cases = llama_cpp_tests(tests_dir / f"{stem}.inp", tests_dir / f"{stem}.out")
    vocab = read_vocab(path, pre)
    if vocab.model not in ("llama", "gpt2"):
        pytest.skip(f"foveal does not read {vocab.model!r} vocabularies")
    tok = build(vocab)
    wrong = [(text, ids, got) for text, ids in cases
             if (got := tok.encode(text, add_special_tokens=False).ids) != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} inputs give other ids than llama.cpp's; first: " + "; ".join(
        f"{text!r}: {got} instead of {ids}" for text, ids, got in wrong[:3])
    not_round_trips = [text for text, ids in cases if tok.decode(ids, skip_special_tokens=False) != text]
    assert not not_round_trips, f"{len(not_round_trips)} inputs do not decode back: {not_round_trips[:3]}"


@pytest.fixture(scope="module")
def spm(gguf_files) -> tuple[Tokenizer, GGUFVocab]:
    vocab = read_vocab(gguf_files("ggml-vocab-llama-spm.gguf"))
    return build(vocab), vocab


def test_sentencepiece_prefixes_every_text_segment_with_a_space(spm):
    tok, vocab = spm
    space, two_spaces = vocab.tokens.index("▁"), vocab.tokens.index("▁▁")

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    assert ids(" ") == [two_spaces]
    assert ids(" Hello world")[0] == space and ids(" Hello world")[1:] == ids("Hello world")
    assert ids("\nHello")[0] == space  # "▁\n": the prefix comes before a newline too
    assert ids("") == []
    # llama.cpp's `is_prev_special`: the text after a special token is prefixed again
    bos, eos = vocab.bos_id, vocab.eos_id
    assert ids("<s>Hello") == [bos] + ids("Hello")
    assert ids("Hello</s> world") == ids("Hello") + [eos] + ids(" world")
    assert tok.encode("Hello").ids == [bos] + ids("Hello")  # add_bos_token: BOS in front
    assert tok.decode(ids(" Hello  world ")) == " Hello  world "


def test_unknown_pre_tokenizer_is_refused_unless_the_fallback_is_asked_for(gguf_files, monkeypatch, caplog):
    vocab = read_vocab(gguf_files("ggml-vocab-deepseek-coder.gguf"), pre="not-a-pre-tokenizer")
    monkeypatch.delenv(PRE_FALLBACK_ENV, raising=False)
    with pytest.raises(UnsupportedModelError) as refused:
        tokenizer_from_vocab(vocab)
    message = str(refused.value)
    assert "'not-a-pre-tokenizer'" in message and f"{PRE_FALLBACK_ENV}=1" in message
    assert all(name in message for name in ("llama-bpe", "qwen2", "deepseek-coder", "default"))

    monkeypatch.setenv(PRE_FALLBACK_ENV, "0")
    with pytest.raises(UnsupportedModelError):
        tokenizer_from_vocab(vocab)

    gpt2_split = build(read_vocab(gguf_files("ggml-vocab-deepseek-coder.gguf"), pre="gpt-2"))
    text = "Hello world 12345"
    for env, options in (("1", {}), ("0", {"pre_fallback": True})):
        monkeypatch.setenv(PRE_FALLBACK_ENV, env)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="foveal.weights.gguf_tokenizer"):
            tok = build(vocab, **options)
        assert "not-a-pre-tokenizer" in caplog.text
        assert tok.encode(text, add_special_tokens=False).ids == gpt2_split.encode(text, add_special_tokens=False).ids


def test_every_named_pre_tokenizer_compiles():
    for name, pre in PRE_TOKENIZERS.items():
        for pattern in pre.splits:
            try:
                pre_tokenizers.Split(Regex(pattern), behavior="isolated")
            except Exception as e:
                pytest.fail(f"{name}: {pattern!r} does not compile: {e}")
