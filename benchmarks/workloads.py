"""The benchmark's models: deterministic random weights at real shapes, saved in HF format.

- "llava-0.5b": CLIP ViT-L/14-336 + mlp2x_gelu + a Qwen2-0.5B-shaped LM (24 layers, hidden 896,
  14 heads / 2 KV heads, FFN 4864, vocab 151936, tied head).
- "llava-1.5b": the same tower and projector + a Qwen2-1.5B-shaped LM (28 layers, hidden 1536,
  12 heads / 2 KV heads, FFN 8960, vocab 151936, tied head).
- "tiny": a few MB, for smoke tests.

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
WORKLOADS = tuple(QWEN2)
IMAGE_TOKEN_ID = 4          # "<image>" in the byte-level tokenizer
QUESTION = "What is this?"  # with the chat template: 32 text tokens around the image


def workload_config(name: str) -> VLMConfig:
    if name not in QWEN2:
        raise ValueError(f"unknown workload {name!r}; use one of {', '.join(WORKLOADS)}")
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
    if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
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
    from foveal.config import config_from_hf, load_config_file
    from foveal.processing.prompt import PromptBuilder, Tokenizer, find_chat_template, normalize_messages
    cfg = config_from_hf(load_config_file(folder / "config.json"))
    tok = Tokenizer.from_folder(folder)
    builder = PromptBuilder(tok, find_chat_template(folder, tok.config), cfg.image_token_id,
                            cfg.image_tokens_per_image, "<image>")
    template_messages, sources = normalize_messages(messages(image), builder.template)
    inputs = builder.build(template_messages, n_images=len(sources))
    return inputs.input_ids, sum(inputs.image_mask)
