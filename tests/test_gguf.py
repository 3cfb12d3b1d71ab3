"""GGUF reading and writing (issue 5): round trips through llama.cpp's format, checked against
transformers on tiny random models, plus quantized types, tokenizers and hostile files."""

from __future__ import annotations

import json
import random
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

from foveal.cli import main as cli_main
from foveal.errors import ConfigError, FovealError, UnsupportedModelError, WeightsError
from foveal.weights.gguf import TEXT_BLOCK_NAMES, HFCheckpoint, read_gguf, read_hf_folder, write_gguf
from foveal.weights.gguf import GGUFFile, llama_qk_order
from foveal.weights.gguf_tokenizer import QWEN2_SPLIT

transformers = pytest.importorskip("transformers")
from transformers.tokenization_utils_base import generate_merges  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today?",
    "A picture of a cat sitting on a mat, next to a dog.",
    "What is in this image? Describe it in detail, please.",
    "USER: look at the picture\nASSISTANT: It shows two llamas.",
    "numbers 12345 and 678, dates 2024-01-01, prices $3.50",
    "naïve café résumé — über straße",
    "it's they're we'll I've you'd",
] * 8
STRINGS = [
    "Hello world",
    "The quick brown fox, the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "naïve café résumé",
    "decomposed e\u0301 and composed é",
    "日本語のテキストと中文",
    "emoji 🦙🚀 test 😶‍🌫️",
    "it's they're WE'LL",
    "numbers 1234567 3.14159",
    "USER: <image>\nWhat is this?\nASSISTANT:",
    "<|im_start|>user\n<image>Describe it<|im_end|>\n<|im_start|>assistant\n",
    "<s> inner </s> specials",
    "",
    " ",
]


# --- tiny tokenizers -----------------------------------------------------------------------
def sentencepiece_style_tokenizer() -> Tokenizer:
    """Llama-style: BPE with byte fallback, `▁` spaces, merges ordered by piece score (which
    is how transformers converts a SentencePiece model), BOS added by the post-processor."""
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=260, show_progress=False))
    learned = trainer.get_vocab()
    pieces = sorted(learned, key=learned.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges({p: vocab[p] for p in pieces}, {p: -float(vocab[p]) for p in pieces})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Llama 2's tokenizer.json form: `▁` before every text segment, as SentencePiece and llama.cpp
    # (a Metaspace pre-tokenizer skips it when the text starts with a space)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", "<image>"]])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    return tok


def byte_level_tokenizer() -> Tokenizer:
    """Qwen2-style: NFC, Qwen2's split regex, byte-level BPE, specials appended, no BOS."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=380, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


SPM_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}
BPE_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}


# --- tiny models ---------------------------------------------------------------------------
def build_model(kind: str, vocab_size: int, image_token: int):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig)
    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=28, patch_size=14)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**text, rms_norm_eps=1e-5, rope_theta=500000.0))
    if kind == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaForCausalLM(LlamaConfig(**text, rope_parameters=rope))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**text, tie_word_embeddings=True, rope_theta=1e6))
    if kind == "llava-clip-llama":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision, projection_dim=16),
                             text_config=LlamaConfig(**text), image_token_index=image_token,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    elif kind == "llava-siglip-qwen2":
        config = LlavaConfig(vision_config=SiglipVisionConfig(**vision),
                             text_config=Qwen2Config(**text, tie_word_embeddings=True, rope_theta=1e6),
                             image_token_index=image_token, vision_feature_layer=-1,
                             vision_feature_select_strategy="full", tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    return LlavaForConditionalGeneration(config)


def save_hf(model, tokenizer: Tokenizer, tokenizer_config: dict, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def load_in_transformers(ckpt: HFCheckpoint, folder: Path):
    """An HFCheckpoint as an HF folder, loaded back by transformers (legacy names included)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(ckpt.config))
    save_file({k: v.contiguous() for k, v in ckpt.tensors.items()}, str(folder / "model.safetensors"))
    cls = LlavaForConditionalGeneration if ckpt.is_vlm else AutoModelForCausalLM
    assert AutoConfig.from_pretrained(folder).model_type == ckpt.config["model_type"]
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def logits_of(model, ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        if pixels is None:
            return model(input_ids=ids).logits
        return model(input_ids=ids, pixel_values=pixels).logits


def inputs(kind: str, tok: Tokenizer, image_token: int):
    ids = tok.encode("Describe the picture, please.").ids
    if not kind.startswith("llava"):
        return torch.tensor([ids]), None
    generator = torch.Generator().manual_seed(1)
    return torch.tensor([ids[:1] + [image_token] * 4 + ids[1:]]), torch.randn(1, 3, 28, 28, generator=generator)


CASES = {  # kind -> (tokenizer builder, tokenizer config)
    "llava-clip-llama": (sentencepiece_style_tokenizer, SPM_CONFIG),
    "llava-siglip-qwen2": (byte_level_tokenizer, BPE_CONFIG),
    "llama": (sentencepiece_style_tokenizer, SPM_CONFIG),
    "qwen2": (byte_level_tokenizer, BPE_CONFIG),
    "llama3-rope": (byte_level_tokenizer, BPE_CONFIG),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case: (HF model, tokenizer, HF folder) built once for the module."""
    made = {}
    for kind, (build_tok, tok_config) in CASES.items():
        tok = build_tok()
        image_token = tok.token_to_id("<image>")
        model = build_model(kind, tok.get_vocab_size() + 13, image_token).eval()  # + unused rows
        folder = save_hf(model, tok, tok_config, tmp_path_factory.mktemp(kind))
        made[kind] = (model, tok, folder)
    return made


# --- (1) logits round trips ----------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CASES))
def test_f32_export_and_read_back_gives_the_same_logits(kind, exported, tmp_path):
    model, tok, folder = exported[kind]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path / "gguf", type="f32")
    assert (mmproj_path is not None) == kind.startswith("llava")
    ckpt = read_gguf(text_path, mmproj_path, dtype=torch.float32)
    reloaded = load_in_transformers(ckpt, tmp_path / "hf")
    ids, pixels = inputs(kind, tok, tok.token_to_id("<image>"))
    expected, actual = logits_of(model, ids, pixels), logits_of(reloaded, ids, pixels)
    diff = (expected - actual).abs().max().item()
    print(f"{kind}: F32 max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("kind", ["llava-clip-llama", "llava-siglip-qwen2", "llama"])
def test_f16_export_is_within_one_percent(kind, exported, tmp_path):
    model, tok, folder = exported[kind]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    ckpt = read_gguf(text_path, mmproj_path, dtype=torch.float32)
    reloaded = load_in_transformers(ckpt, tmp_path / "hf")
    ids, pixels = inputs(kind, tok, tok.token_to_id("<image>"))
    expected, actual = logits_of(model, ids, pixels), logits_of(reloaded, ids, pixels)
    relative = ((expected - actual).abs().max() / expected.abs().max()).item()
    print(f"{kind}: F16 max |logit diff| / max |logit| = {relative:.2e}")
    assert relative <= 1e-2
    with GGUFFile(text_path) as gf:  # llama.cpp's type layout: 2-D f16, 1-D f32
        assert gf.tensors["blk.0.attn_q.weight"].qtype == Q.F16
        assert gf.tensors["blk.0.attn_norm.weight"].qtype == Q.F32


def test_bfloat16_is_the_default_read_dtype(exported, tmp_path):
    _, _, folder = exported["llama"]
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    ckpt = read_gguf(text_path)
    assert {t.dtype for t in ckpt.tensors.values()} == {torch.bfloat16}


# --- (2) Q8_0 / Q4_0 -----------------------------------------------------------------------
@pytest.mark.parametrize("type_, bound", [("q8_0", 0.01), ("q4_0", 0.15)])
def test_quantized_export_dequantizes_close_to_the_original(type_, bound, exported, tmp_path):
    model, tok, folder = exported["llava-clip-llama"]
    original = read_hf_folder(folder)
    text_path, mmproj_path = write_gguf(original, tmp_path, type=type_)
    ckpt = read_gguf(text_path, mmproj_path, dtype=torch.float32)
    worst = 0.0
    for name, tensor in ckpt.tensors.items():
        reference = original.tensors[name].float()
        if tensor.dim() < 2:
            assert torch.equal(tensor, reference), name  # 1-D tensors stay f32
            continue
        error = ((tensor - reference).norm() / reference.norm()).item()
        worst = max(worst, error)
    reloaded = load_in_transformers(ckpt, tmp_path / "hf")
    ids, pixels = inputs("llava-clip-llama", tok, tok.token_to_id("<image>"))
    expected, actual = logits_of(model, ids, pixels), logits_of(reloaded, ids, pixels)
    relative = ((expected - actual).abs().max() / expected.abs().max()).item()
    agree = (expected.argmax(-1) == actual.argmax(-1)).float().mean().item()
    print(f"{type_}: worst relative weight error {worst:.4f}, max logit diff / max |logit| {relative:.4f}, "
          f"argmax agreement {agree:.2%}")
    assert worst <= bound
    with GGUFFile(text_path) as gf:
        assert gf.tensors["blk.0.ffn_up.weight"].qtype == Q[type_.upper()]
        # the head keeps more bits: F16 under q8_0, Q8_0 under q4_0 (as llama-quantize keeps `output`)
        assert gf.tensors["output.weight"].qtype == {"q8_0": Q.F16, "q4_0": Q.Q8_0}[type_]
        assert gf.metadata["general.file_type"] == {"q8_0": 7, "q4_0": 2}[type_]
    with GGUFFile(mmproj_path) as gf:  # the vision side is never quantized
        assert gf.tensors["v.blk.0.attn_q.weight"].qtype == Q.F16


@pytest.mark.parametrize("kind, tied", [("llava-clip-llama", False), ("llava-siglip-qwen2", True)])
def test_head_type_picks_the_output_heads_type(kind, tied, exported, tmp_path):
    """`head_type=` (CLI --head-type) sets the output head's type, or the tied embedding's that
    serves as the head; every other weight keeps --type. A bad name is refused."""
    _, _, folder = exported[kind]
    head = "token_embd.weight" if tied else "output.weight"
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path / "a", type="q8_0", head_type="q8_0")
    with GGUFFile(text_path) as gf:
        assert gf.tensors[head].qtype == Q.Q8_0
        assert gf.tensors["blk.0.attn_q.weight"].qtype == Q.Q8_0
        if not tied:
            assert gf.tensors["token_embd.weight"].qtype == Q.Q8_0
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path / "b", type="q8_0")
    with GGUFFile(text_path) as gf:
        assert gf.tensors[head].qtype == Q.F16
    assert cli_main(["export", str(folder), "--gguf", str(tmp_path / "c"), "--type", "q4_0",
                     "--head-type", "f16"]) == 0
    with GGUFFile(next((tmp_path / "c").glob("model-*.gguf"))) as gf:
        assert gf.tensors[head].qtype == Q.F16
        assert gf.tensors["blk.0.ffn_up.weight"].qtype == Q.Q4_0
    with pytest.raises(ConfigError, match="head type"):
        write_gguf(read_hf_folder(folder), tmp_path / "d", type="q8_0", head_type="q2_k")


# --- (3) tokenizers ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokenizer_round_trip_encodes_exactly_like_the_original(kind, exported, tmp_path):
    _, tok, folder = exported[kind]
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    ckpt = read_gguf(text_path)
    again = Tokenizer.from_str(ckpt.tokenizer_json)
    for text in STRINGS:
        assert again.encode(text).ids == tok.encode(text).ids, text
        assert again.decode(again.encode(text).ids) == tok.decode(tok.encode(text).ids)
    expected_config = SPM_CONFIG if kind == "llama" else BPE_CONFIG
    for key in ("bos_token", "eos_token", "chat_template"):
        assert ckpt.tokenizer_config[key] == expected_config[key]
    assert ckpt.tokenizer_config["add_bos_token"] is (kind == "llama")


def test_sentencepiece_scores_alone_rebuild_the_merges(exported, tmp_path):
    """Real llama GGUFs carry scores but no merges: the merges come from the scores."""
    _, tok, folder = exported["llama"]
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    stripped = rewrite_gguf(text_path, tmp_path / "no-merges.gguf", drop_keys={"tokenizer.ggml.merges"})
    with GGUFFile(stripped) as gf:
        assert "tokenizer.ggml.merges" not in gf.metadata
        assert gf.metadata["tokenizer.ggml.model"] == "llama"
        assert len(gf.metadata["tokenizer.ggml.scores"]) == len(gf.metadata["tokenizer.ggml.tokens"])
    again = Tokenizer.from_str(read_gguf(stripped).tokenizer_json)
    for text in STRINGS:
        assert again.encode(text).ids == tok.encode(text).ids, text


def test_written_metadata_is_what_llama_cpp_reads(exported, tmp_path):
    _, tok, folder = exported["llava-siglip-qwen2"]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    with GGUFFile(text_path) as gf:
        meta = gf.metadata
        assert meta["general.architecture"] == "qwen2"
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
        assert meta["qwen2.block_count"] == 2 and meta["qwen2.attention.head_count_kv"] == 2
        assert meta["qwen2.rope.freq_base"] == 1e6 and "output.weight" not in gf.tensors  # tied
        assert meta["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|im_end|>")
        assert meta["tokenizer.ggml.token_type"][tok.token_to_id("<|im_start|>")] == gguf.TokenType.CONTROL
        assert meta["tokenizer.ggml.tokens"][-1].startswith("[PAD")  # padded to the embedding rows
        assert meta["tokenizer.chat_template"] == BPE_CONFIG["chat_template"]
    with GGUFFile(mmproj_path) as gf:
        meta = gf.metadata
        assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "mlp"
        assert meta["clip.has_vision_encoder"] and meta["clip.has_llava_projector"]
        assert meta["clip.use_gelu"] and list(meta["clip.vision.feature_layer"]) == [3]
        assert meta["clip.vision.block_count"] == 3 and "v.class_embd" not in gf.tensors
        assert gf.tensors["v.blk.0.ffn_up.weight"].shape == (64, 32)  # fc1 -> ffn_up
        assert "v.post_ln.weight" not in gf.tensors


def test_bpe_without_merges_is_refused_with_a_clear_error(tmp_path):
    """llama.cpp (and foveal's reader) refuse a gpt2-model vocabulary without merges, and gguf
    cannot write an empty array: the export says so instead of writing a file nobody loads."""
    from foveal.bundled import build_random_model
    folder = build_random_model(tmp_path / "model")          # byte-level BPE: no merges at all
    with pytest.raises(WeightsError, match="without merges"):
        write_gguf(read_hf_folder(folder), tmp_path / "out", type="f32")


# --- (4) llama.cpp's quantized types, written with gguf's own writer -----------------------
# byte offsets of the float16 scale fields in one block, to give crafted blocks sane scales
_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def quantized_blocks(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:  # K-quants: gguf can only dequantize them, so craft blocks
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (*values.shape[:-1], values.shape[-1] // block, size), dtype=np.uint8)
        for offset in _SCALE_FIELDS[qtype]:
            scale = rng.uniform(0.001, 0.05, raw.shape[:-1]).astype(np.float16)
            raw[..., offset:offset + 2] = scale[..., None].view(np.uint8).reshape(*scale.shape, 2)
        return raw.reshape(*values.shape[:-1], -1)


TEXT_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}


def test_every_llama_cpp_weight_type_dequantizes_like_gguf_quants(tmp_path):
    rng = np.random.default_rng(0)
    hidden, ffn, heads = 256, 512, 2
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "in"]
    vocab = len(tokens)
    qtypes = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    for i in range(2):  # two blocks: enough tensors for every type
        for key, shape in {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden),
                           "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
                           "ffn_down": (hidden, ffn)}.items():
            shapes[f"blk.{i}.{key}.weight"] = shape
    writer = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    for key, value in {"context_length": 64, "embedding_length": hidden, "feed_forward_length": ffn,
                       "block_count": 2, "attention.head_count": heads, "attention.head_count_kv": heads}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he", "i n"])
    stored = {}
    for i, (name, shape) in enumerate(shapes.items()):
        qtype = qtypes[i % len(qtypes)] if name != "output.weight" else Q.Q6_K
        data = quantized_blocks(rng.standard_normal(shape, dtype=np.float32), qtype, rng)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        stored[name] = (data, qtype)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight",
                 "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight"):
        writer.add_tensor(name, rng.standard_normal(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ckpt = read_gguf(tmp_path / "k.gguf", dtype=torch.float32)
    unpermute = np.argsort(llama_qk_order(hidden, heads))
    seen = set()
    for name, (data, qtype) in stored.items():
        expected = gguf.quants.dequantize(data, qtype) if data.dtype == np.uint8 else data.astype(np.float32)
        if ".attn_q." in name or ".attn_k." in name:
            expected = expected[unpermute]
        if name in TEXT_GLOBAL:
            hf = TEXT_GLOBAL[name]
        else:
            _, block, key, _ = name.split(".")
            hf = f"model.layers.{block}.{TEXT_BLOCK_NAMES[key]}.weight"
        np.testing.assert_array_equal(ckpt.tensors[hf].numpy(), expected, err_msg=f"{name} {qtype.name}")
        assert np.isfinite(expected).all()
        seen.add(qtype)
    assert {Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16} <= seen


def test_llama_cpp_permutation_is_undone():
    # q rows h*hd + 2j + s in GGUF come from HF rows h*hd + s*hd/2 + j
    order = llama_qk_order(8, 2)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# --- legacy mmproj conventions -------------------------------------------------------------
def test_legacy_llava_mmproj_with_swapped_ffn_names_and_no_feature_layer(exported, tmp_path):
    """The old LLaVA converter: fc1 stored as ffn_down, unused last layer dropped, no
    clip.vision.feature_layer. The features are the last stored layer's output."""
    model, tok, folder = exported["llava-clip-llama"]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="f32")
    swap = {".ffn_up.": ".ffn_down.", ".ffn_down.": ".ffn_up."}

    def legacy_name(name: str) -> str:
        for a, b in swap.items():
            if a in name:
                return name.replace(a, b)
        return name

    legacy = rewrite_gguf(mmproj_path, tmp_path / "legacy-mmproj.gguf",
                          drop_keys={"clip.vision.feature_layer"}, rename=legacy_name)
    ckpt = read_gguf(text_path, legacy, dtype=torch.float32)
    assert ckpt.config["vision_feature_layer"] == -1 and ckpt.config["vision_config"]["num_hidden_layers"] == 2
    reloaded = load_in_transformers(ckpt, tmp_path / "hf")
    ids, pixels = inputs("llava-clip-llama", tok, tok.token_to_id("<image>"))
    assert (logits_of(model, ids, pixels) - logits_of(reloaded, ids, pixels)).abs().max() <= 1e-4
    assert ckpt.preprocessor_config["crop_size"] == {"height": 28, "width": 28}


def test_gguf_without_an_image_token_gets_one_past_the_vocabulary(exported, tmp_path):
    _, _, folder = exported["llava-clip-llama"]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    renamed = rewrite_gguf(text_path, tmp_path / "no-image-token.gguf",
                           edit_tokens=lambda tokens: ["<img-gone>" if t == "<image>" else t for t in tokens])
    ckpt = read_gguf(renamed, mmproj_path)
    vocab_size = ckpt.config["text_config"]["vocab_size"]
    assert ckpt.config["image_token_index"] == vocab_size
    assert Tokenizer.from_str(ckpt.tokenizer_json).encode("a <image> b").ids.count(vocab_size) == 1
    # and such a checkpoint exports again: the placeholder stays out of the GGUF vocabulary
    again_text, _ = write_gguf(ckpt, tmp_path / "again", type="f16")
    with GGUFFile(again_text) as gf:
        assert len(gf.metadata["tokenizer.ggml.tokens"]) == vocab_size
        assert gf.metadata["general.name"] == "model"


def test_split_gguf_is_read_from_its_first_shard(exported, tmp_path):
    _, _, folder = exported["llava-clip-llama"]
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path, type="q8_0")
    rewrite_gguf(text_path, tmp_path / "split" / "model.gguf", split_max_tensors=7)
    shards = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.gguf"
    whole, split = read_gguf(text_path), read_gguf(shards[0])
    assert split.config == whole.config and split.tokenizer_json == whole.tokenizer_json
    assert all(torch.equal(split.tensors[k], whole.tensors[k]) for k in whole.tensors)
    shards[-1].unlink()
    with pytest.raises(WeightsError, match="missing"):
        read_gguf(shards[0])


# --- read_hf_folder layouts ----------------------------------------------------------------
def test_read_hf_folder_normalises_v5_names_and_shards(exported, tmp_path):
    _, _, folder = exported["llava-clip-llama"]
    legacy = read_hf_folder(folder)
    v5 = {}
    for name, tensor in legacy.tensors.items():
        name = name.replace("language_model.model.", "model.language_model.")
        name = name.replace("language_model.lm_head.", "lm_head.")
        name = name.replace("vision_tower.", "model.vision_tower.").replace("multi_modal_projector.", "model.multi_modal_projector.")
        v5[name] = tensor
    names = sorted(v5)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "v5"
    out.mkdir()
    for file, keys in shards.items():
        save_file({k: v5[k].contiguous() for k in keys}, str(out / file))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / file).write_bytes((folder / file).read_bytes())
    (out / "chat_template.jinja").write_text("{{ 'jinja wins' }}")
    again = read_hf_folder(out)
    assert sorted(again.tensors) == sorted(legacy.tensors)
    assert all(torch.equal(again.tensors[k], legacy.tensors[k]) for k in legacy.tensors)
    assert again.tokenizer_config["chat_template"] == "{{ 'jinja wins' }}"


# --- (5) bad files -------------------------------------------------------------------------
def gguf_bytes(*, version=3, n_tensors=None, n_kv=None, kv=(), tensors=(), pad_data=0) -> bytes:
    """A hand-made GGUF: kv = [(key, type, packed value)], tensors = [(name, ne, type, offset)]."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()
    body = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kv) if n_kv is None else n_kv)
    for key, vtype, packed in kv:
        body += string(key) + struct.pack("<I", vtype) + packed
    for name, ne, qtype, offset in tensors:
        body += string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        body += struct.pack("<IQ", qtype, offset)
    body += b"\0" * (-len(body) % 32)
    return body + b"\0" * pad_data


ARCH_LLAMA = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")

BAD_FILES = {
    "bad magic": b"GGML" + b"\0" * 60,
    "empty": b"",
    "version 1": gguf_bytes(version=1),
    "big-endian": gguf_bytes(version=3 << 24),
    "truncated header": gguf_bytes(kv=[ARCH_LLAMA])[:30],
    "2**60 tensors": gguf_bytes(n_tensors=2**60, kv=[ARCH_LLAMA]),
    "2**60 keys": gguf_bytes(n_kv=2**60),
    "huge string": gguf_bytes(kv=[("general.name", 8, struct.pack("<Q", 2**62))]),
    "huge array": gguf_bytes(kv=[("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**40))]),
    "huge numeric array": gguf_bytes(kv=[("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2**33))]),
    "nested array": gguf_bytes(kv=[("x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))]),
    "unknown value type": gguf_bytes(kv=[("x", 77, b"")]),
    "dim of 2**40": gguf_bytes(kv=[ARCH_LLAMA], tensors=[("token_embd.weight", (2**40, 2**40), 0, 0)], pad_data=64),
    "tensor past the end": gguf_bytes(kv=[ARCH_LLAMA], tensors=[("token_embd.weight", (8, 8), 0, 0)], pad_data=100),
    "offset past the end": gguf_bytes(kv=[ARCH_LLAMA], tensors=[("token_embd.weight", (8,), 0, 2**50)], pad_data=64),
    "five dims": gguf_bytes(kv=[ARCH_LLAMA], tensors=[("t", (1, 1, 1, 1, 1), 0, 0)], pad_data=64),
    "unknown tensor type": gguf_bytes(kv=[ARCH_LLAMA], tensors=[("t", (32,), 99, 0)], pad_data=256),
    "partial block": gguf_bytes(kv=[ARCH_LLAMA], tensors=[("t", (33,), int(Q.Q8_0), 0)], pad_data=256),
    "duplicate key": gguf_bytes(kv=[ARCH_LLAMA, ARCH_LLAMA]),
    "no tensors": gguf_bytes(kv=[ARCH_LLAMA]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_without_large_allocations(case, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(BAD_FILES[case])
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError) as raised:
            read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(raised.value) or "GGUF" in str(raised.value)
    assert peak < 8 << 20, f"{case}: peak allocation {peak} bytes"


def test_unknown_architecture_and_swapped_files_are_refused(exported, tmp_path):
    gpt = tmp_path / "neox.gguf"
    gpt.write_bytes(gguf_bytes(kv=[("general.architecture", 8, struct.pack("<Q", 8) + b"gpt-neox")]))
    with pytest.raises(UnsupportedModelError, match="gpt-neox"):
        read_gguf(gpt)
    _, _, folder = exported["llava-clip-llama"]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    with pytest.raises(WeightsError, match="mmproj"):
        read_gguf(mmproj_path)
    with pytest.raises(WeightsError, match="not an mmproj"):
        read_gguf(text_path, text_path)


def test_truncated_real_file_says_so(exported, tmp_path):
    _, _, folder = exported["llama"]
    text_path, _ = write_gguf(read_hf_folder(folder), tmp_path, type="q8_0")
    data = text_path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 1000):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated|past the end"):
            read_gguf(tmp_path / "cut.gguf")


def test_fuzzed_files_raise_only_foveal_errors(exported, tmp_path):
    """Seeded random corruption of small valid files (a Q8_0 text model and its mmproj):
    success or a FovealError, nothing else."""
    _, _, folder = exported["llava-clip-llama"]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="q8_0")
    originals = {}
    for path in (text_path, mmproj_path):
        with GGUFFile(path) as gf:  # where the tensor data starts: before it, parsing decisions
            originals[path] = (path.read_bytes(), min(info.offset for info in gf.tensors.values()))
    rng = random.Random(1234)
    outcomes = {"ok": 0}
    for trial in range(200):
        target = (text_path, mmproj_path)[trial % 2]
        data, header_end = originals[target]
        corrupt = bytearray(data)
        if rng.random() < 0.2:
            corrupt = corrupt[:rng.randrange(len(corrupt))]
        else:
            for _ in range(rng.randint(1, 8)):
                where = rng.randrange(header_end if rng.random() < 0.85 else len(corrupt))
                corrupt[where] = rng.randrange(256)
        fuzzed = tmp_path / "fuzz.gguf"
        fuzzed.write_bytes(bytes(corrupt))
        try:
            read_gguf(fuzzed) if target == text_path else read_gguf(text_path, fuzzed)
            outcomes["ok"] += 1
        except FovealError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    print(f"fuzz outcomes over 200 files: {outcomes}")
    assert sum(outcomes.values()) == 200


def test_metadata_of_the_wrong_type_raises_only_foveal_errors(exported, tmp_path, monkeypatch):
    """A corrupt file may hold any type under any key: replace each key's value in turn."""
    from foveal.weights import gguf_read
    _, _, folder = exported["llava-clip-llama"]
    text_path, mmproj_path = write_gguf(read_hf_folder(folder), tmp_path, type="f16")
    outcomes = {"ok": 0}
    for target in (text_path, mmproj_path):
        with GGUFFile(target) as gf:
            keys = {key: isinstance(value, int) for key, value in gf.metadata.items()}
        for key, is_int in keys.items():
            for value in ["x", np.array([1, 2], dtype=np.int32)] + [2**40] * is_int:
                def tampered(path, target=target, key=key, value=value):
                    gf = GGUFFile(path)
                    if Path(path) == target:
                        gf.metadata[key] = value
                    return gf
                monkeypatch.setattr(gguf_read, "open_gguf", tampered)
                try:
                    read_gguf(text_path, mmproj_path)
                    outcomes["ok"] += 1
                except FovealError as e:
                    outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    print(f"type-confusion outcomes: {outcomes}")
    assert outcomes["ok"] < sum(outcomes.values())


# --- helpers -------------------------------------------------------------------------------
def rewrite_gguf(src: Path, dst: Path, *, drop_keys=frozenset(), rename=lambda n: n, edit_tokens=None,
                 split_max_tensors=0) -> Path:
    """Copy a (valid) GGUF with gguf's own reader and writer, changing metadata or names."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(dst, arch, split_max_tensors=split_max_tensors)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in drop_keys or key == "general.architecture":
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens" and edit_tokens is not None:
            value = edit_tokens(value)
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        data = np.asarray(tensor.data)
        if tensor.tensor_type in (Q.F32, Q.F16):
            writer.add_tensor(rename(tensor.name), data.reshape(shape))
        else:
            writer.add_tensor(rename(tensor.name), data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
