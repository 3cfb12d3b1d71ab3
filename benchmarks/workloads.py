"""The benchmark's models: deterministic random weights at real shapes, saved in HF format.

- "llava-0.5b": CLIP ViT-L/14-336 + mlp2x_gelu + a Qwen2-0.5B-shaped LM (24 layers, hidden 896,
  14 heads / 2 KV heads, FFN 4864, vocab 151936, tied head).
- "llava-1.5b": the same tower and projector + a Qwen2-1.5B-shaped LM (28 layers, hidden 1536,
  12 heads / 2 KV heads, FFN 8960, vocab 151936, tied head).
- "tiny": a few MB, for smoke tests.
- "qwen2.5-vl-3b": Qwen2.5-VL-3B-Instruct's shapes: a 32-block window-attention ViT
  over 14-px patches at the image's own size + a 36-layer Qwen2 LM with M-RoPE; "qwen2.5-vl-tiny"
  has the same structure at a few dozen MB.

Weights are generated tensor by tensor in bfloat16 straight into the state dict (a seeded
generator per tensor name), so building llava-1.5b never holds a float32 copy; the folder is
reused while its config matches. The tokenizer is foveal's byte-level one (the ids are all the
benchmark needs; the vocabulary rows beyond it are never looked up by the prompt).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from foveal.bundled import CHAT_TEMPLATE, byte_level_tokenizer
from foveal.config import ProjectorConfig, RopeConfig, TextConfig, VisionConfig, VLMConfig

CLIP_L_336 = VisionConfig(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                          num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
QWEN2 = {   # (hidden, layers, heads, kv heads, head dim, FFN)
    "llava-0.5b": (896, 24, 14, 2, 64, 4864),
    "llava-1.5b": (1536, 28, 12, 2, 128, 8960),
    "tiny": (128, 2, 4, 2, 32, 256),
}
LLAVA_WORKLOADS = tuple(QWEN2)
# Qwen2.5-VL: (text: hidden, layers, heads, kv heads, FFN, mrope_section; vision: depth, hidden, heads,
# intermediate, fullatt_block_indexes); head_dim = hidden / heads, out_hidden = the text hidden size
QWEN_VL = {
    "qwen2.5-vl-3b": ((2048, 36, 16, 2, 11008, (16, 24, 24)), (32, 1280, 16, 3420, (7, 15, 23, 31))),
    "qwen2.5-vl-tiny": ((128, 2, 4, 2, 256, (4, 6, 6)), (4, 64, 4, 128, (1, 3))),
}
QWEN_IMAGE_SIZE = (1280, 960)
WORKLOADS = LLAVA_WORKLOADS + tuple(QWEN_VL)
IMAGE_TOKEN_ID = 4          # "<image>" in the byte-level tokenizer
QUESTION = "What is this?"  # with the chat template: 32 text tokens around the image


def workload_config(name: str) -> VLMConfig:
    if name not in QWEN2:
        raise ValueError(f"unknown LLaVA workload {name!r}; use one of {', '.join(LLAVA_WORKLOADS)}")
    hidden, layers, heads, kv, head_dim, ffn = QWEN2[name]
    vocab = 1000 if name == "tiny" else 151936
    vision = (VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8) if name == "tiny" else CLIP_L_336)
    text = TextConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      attention_bias=True, rope=RopeConfig(theta=1000000.0), bos_token_id=1, eos_token_id=[2],
                      pad_token_id=3)
    return VLMConfig(text=text, vision=vision, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                     projector=ProjectorConfig(kind="mlp2x_gelu", in_features=vision.hidden_size,
                                               out_features=hidden))


def _random_tensor(name: str, shape, dtype) -> torch.Tensor:
    if (name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")) or "layer_norm" in name
            or "layrnorm" in name):
        return torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
    if len(shape) < 2 and not name.endswith("class_embedding"):
        return torch.zeros(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    std = 0.02 if "embed" in name else 0.05
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


def bench_tokenizer() -> str:
    """The byte-level tokenizer plus one merge of two control bytes that no prompt here contains:
    llama.cpp refuses a BPE vocabulary without merges, and this one changes no token id."""
    tok = json.loads(byte_level_tokenizer())
    vocab = tok["model"]["vocab"]
    vocab["\u0100\u0101"] = len(vocab)
    tok["model"]["merges"] = [["\u0100", "\u0101"]]
    return json.dumps(tok)


def build(name: str, root: Path, dtype=torch.bfloat16) -> Path:
    """Write (or reuse) the workload's HF folder under root; returns it."""
    if name in QWEN_VL:
        return build_qwen_vl(name, root)
    from foveal.api import no_init_weights
    from foveal.models.vlm import VisionLanguageModel
    from foveal.weights.save import config_to_hf, save_checkpoint
    cfg = workload_config(name)
    folder = Path(root) / name
    tokenizer = bench_tokenizer()
    stamp = json.dumps([config_to_hf(cfg), hashlib.sha256(tokenizer.encode()).hexdigest()], sort_keys=True)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists() \
            and (folder / ".bench-stamp").exists() and (folder / ".bench-stamp").read_text() == stamp:
        return folder
    import shutil
    for stale in folder.glob("gguf-*"):        # exports of the model this one replaces
        shutil.rmtree(stale)
    with torch.device("meta"), no_init_weights():
        model = VisionLanguageModel(cfg)
    state = {}
    for key, p in model.state_dict().items():
        if key.startswith("lm_head.") and cfg.text.tie_word_embeddings:
            continue
        if "inv_freq" in key:
            continue
        state[key] = _random_tensor(key, tuple(p.shape), dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    size = cfg.vision.image_size
    save_checkpoint(model, cfg, folder, tokenizer_json=tokenizer,
                    tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                      "pad_token": "<pad>", "image_token": "<image>",
                                      "tokenizer_class": "PreTrainedTokenizerFast"},
                    chat_template=CHAT_TEMPLATE,
                    image_processor={"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                                     "crop_size": {"height": size, "width": size}, "do_center_crop": True,
                                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                     "image_std": [0.26862954, 0.26130258, 0.27577711]})
    (folder / ".bench-stamp").write_text(stamp)
    return folder


def export_gguf(folder: Path, kind: str) -> tuple[Path, Path]:
    """GGUF text model + mmproj for llama.cpp (kind: f16, q8_0, q4_0), reused when present."""
    from foveal.weights.gguf import read_hf_folder, write_gguf
    out = folder / f"gguf-{kind}"
    done = out / ".done"
    if done.exists():
        paths = json.loads(done.read_text())
        return Path(paths[0]), Path(paths[1])
    # the head in Q8_0 under q8_0 too (the export's default keeps it F16): foveal int8 reads an
    # int8 head, so both engines read the same bytes per token
    model, mmproj = write_gguf(read_hf_folder(folder), out, type=kind, head_type="q8_0" if kind == "q8_0" else None)
    done.write_text(json.dumps([str(model), str(mmproj)]))
    return model, mmproj


def image_size(name: str) -> tuple[int, int]:
    """(width, height) of the workload's image: a 640x480 photo for LLaVA (resized to 336 anyway), 1280x960
    for Qwen2.5-VL, which keeps the image's own resolution within its pixel budget."""
    return QWEN_IMAGE_SIZE if name in QWEN_VL else (640, 480)


def make_image(path: Path, size=(640, 480)) -> Path:
    """A deterministic noisy photo-sized PNG (decoding it is part of preprocessing)."""
    import numpy as np
    from PIL import Image
    if not path.exists():
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size[1], 0:size[0]]
        base = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) * 255 // sum(size)], -1)
        noise = rng.integers(0, 40, (*base.shape[:2], 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8")).save(path)
    return path


def messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": QUESTION}]}]


def prompt_ids(folder: Path, image) -> tuple[list[int], int]:
    """The benchmark prompt's token ids (image slots expanded) and its image-token count, with no
    weights loaded: every engine gets the same ids."""
    if is_qwen_vl(folder):
        return qwen_vl_prompt_ids(folder, messages(image))
    from foveal.config import config_from_hf, load_config_file
    from foveal.processing.prompt import PromptBuilder, Tokenizer, find_chat_template, normalize_messages
    cfg = config_from_hf(load_config_file(folder / "config.json"))
    tok = Tokenizer.from_folder(folder)
    builder = PromptBuilder(tok, find_chat_template(folder, tok.config), cfg.image_token_id,
                            cfg.image_tokens_per_image, "<image>")
    template_messages, sources = normalize_messages(messages(image), builder.template)
    inputs = builder.build(template_messages, n_images=len(sources))
    return inputs.input_ids, sum(inputs.image_mask)


# ---- Qwen2.5-VL ---------------------------------------------------------------------------------
# Qwen2-VL's special tokens at their ids in Qwen's vocabulary (151643..151656); the ordinary tokens
# are bytes (ids 0..256, as bench_tokenizer), the rows in between are never looked up
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL = 151643
QWEN_IDS = {t: QWEN_FIRST_SPECIAL + i for i, t in enumerate(QWEN_SPECIALS)}
# Qwen2-VL-*-Instruct's chat template (Qwen2.5-VL ships the same one)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen2VLImageProcessor as transformers 5 saves it with its class defaults (pixel budget 56*56 to
# 28*28*1280: a 1280x960 image is resized to 1148x840, 1230 tokens)
QWEN_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "merge_size": 2, "patch_size": 14, "resample": 3,
    "rescale_factor": 1 / 255, "size": {"longest_edge": 28 * 28 * 1280, "shortest_edge": 56 * 56},
    "temporal_patch_size": 2,
}


def qwen_vl_hf_config(name: str) -> dict:
    """config.json as transformers 5 writes a Qwen2_5_VLConfig (nested text_config / vision_config)."""
    (hidden, layers, heads, kv, ffn, mrope), (depth, v_hidden, v_heads, v_ffn, full) = QWEN_VL[name]
    text = {
        "model_type": "qwen2_5_vl_text", "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "use_cache": True,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 70,
        "layer_types": ["full_attention"] * layers, "attention_dropout": 0.0, "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "mrope_section": list(mrope), "rope_theta": 1000000.0},
        "bos_token_id": QWEN_IDS["<|endoftext|>"], "eos_token_id": QWEN_IDS["<|im_end|>"],
        "pad_token_id": QWEN_IDS["<|endoftext|>"],
    }
    vision = {
        "model_type": "qwen2_5_vl_vision", "depth": depth, "hidden_size": v_hidden, "num_heads": v_heads,
        "intermediate_size": v_ffn, "out_hidden_size": hidden, "hidden_act": "silu", "in_channels": 3,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": list(full), "tokens_per_second": 2, "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "dtype": "bfloat16",
        "text_config": text, "vision_config": vision, "tie_word_embeddings": True,
        "image_token_id": QWEN_IDS["<|image_pad|>"], "video_token_id": QWEN_IDS["<|video_pad|>"],
        "vision_start_token_id": QWEN_IDS["<|vision_start|>"], "vision_end_token_id": QWEN_IDS["<|vision_end|>"],
    }


def qwen_tokenizer() -> str:
    """Byte tokens (+ the one merge llama.cpp wants, as bench_tokenizer) and Qwen2-VL's special tokens at
    their own ids: the vocabulary has gaps, which tokenizers, transformers and the GGUF export keep."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["\u0100\u0101"] = len(vocab)
    vocab |= QWEN_IDS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0100", "\u0101")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN_SPECIALS)
    return tok.to_str()


def qwen_vl_tensors(raw: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every stored tensor, from foveal's model built on the meta device: transformers
    5's module names (`model.visual.*`, `model.language_model.*`); a tied head is not stored."""
    from foveal.api import no_init_weights
    from foveal.models.registry import family_for
    family = family_for(raw)
    cfg = family.config(raw)
    with torch.device("meta"), no_init_weights():
        model = family.build(cfg)
    out = []
    for key, p in model.state_dict().items():
        if "inv_freq" in key or ".kv_cache." in key or (key.startswith("lm_head.") and cfg.text.tie_word_embeddings):
            continue
        out.append(("model." + key if key.startswith(("visual.", "language_model.")) else key, tuple(p.shape)))
    return out


def write_safetensors(path: Path, tensors, make) -> None:
    """Stream tensors into one safetensors file: the header from the shapes first, then each tensor made
    (make(name, shape)) and written alone, so the whole model is never in memory."""
    offsets, start = {}, 0
    for name, shape in tensors:
        end = start + 2 * int(torch.Size(shape).numel())
        offsets[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [start, end]}
        start = end
    header = json.dumps({"__metadata__": {"format": "pt"}, **offsets}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, shape in tensors:
            t = make(name, shape).contiguous()
            f.write(t.view(torch.int16).numpy().data)
            del t
    tmp.replace(path)


def build_qwen_vl(name: str, root: Path) -> Path:
    """Write (or reuse) a Qwen2.5-VL workload's HF folder under root; returns it."""
    raw = qwen_vl_hf_config(name)
    folder = Path(root) / name
    tokenizer = qwen_tokenizer()
    stamp = json.dumps([raw, QWEN_PREPROCESSOR, QWEN2_VL_TEMPLATE, hashlib.sha256(tokenizer.encode()).hexdigest()],
                       sort_keys=True)
    if (folder / "model.safetensors").exists() and (folder / ".bench-stamp").exists() \
            and (folder / ".bench-stamp").read_text() == stamp:
        return folder
    import shutil
    for stale in folder.glob("gguf-*"):
        shutil.rmtree(stale)
    (folder / ".bench-stamp").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", qwen_vl_tensors(raw),
                      lambda key, shape: _random_tensor(key, shape, torch.bfloat16))
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": QWEN_IDS["<|endoftext|>"], "eos_token_id": [QWEN_IDS["<|im_end|>"], QWEN_IDS["<|endoftext|>"]],
         "pad_token_id": QWEN_IDS["<|endoftext|>"]}, indent=2))
    (folder / "tokenizer.json").write_text(tokenizer)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 131072}, indent=2))
    (folder / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR, indent=2))
    (folder / ".bench-stamp").write_text(stamp)
    return folder


def is_qwen_vl(folder: Path) -> bool:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type") in ("qwen2_vl", "qwen2_5_vl")


def qwen_vl_prompt_ids(folder: Path, msgs: list[dict]) -> tuple[list[int], int]:
    """foveal's Qwen2-VL processor without the weights: ids with the image's `<|image_pad|>` run (its
    count from the image's size and the pixel budget) and that count."""
    from foveal.api import _from_folder
    from foveal.models.registry import family_for
    from foveal.processing.images import ImageLimits
    ck = _from_folder(Path(folder))
    family = family_for(ck.raw_config)
    prepared = family.processor(family.config(ck.raw_config), ck).prepare(msgs, ImageLimits())
    return list(prepared.input_ids), sum(prepared.image_mask)
