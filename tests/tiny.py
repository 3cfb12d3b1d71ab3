"""Tiny real models for tests: built with transformers, saved to disk in HF format.

Each builder writes a complete checkpoint folder (config.json, safetensors, tokenizer.json,
tokenizer_config.json, chat template, preprocessor config) the way transformers'
`save_pretrained` writes it, then optionally rewrites the tensor names into another layout
(legacy llava-hf, transformers v5, the original LLaVA repo).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "USER: What is in this image? ASSISTANT: A red circle and a blue square.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "How many shapes are there? There are three shapes: a triangle, a star and a circle.",
    "Describe the picture in detail. Colours: red green blue yellow purple orange white black.",
    "Ünïcödé tëxt, emoji 🙂 and 日本語 also appear sometimes.",
    "system user assistant <|im_start|> <|im_end|> hello world",
]
QWEN_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-*-Instruct's chat template (tokenizer_config.json), as the hub ships it
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
# Qwen3-VL-*-Instruct's chat template without its tool branches (no default system prompt, unlike Qwen2-VL's)
QWEN3_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count) %}{%- if content is string %}{{- content }}{%- else %}"
    "{%- for item in content %}{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'video' in item or item.type == 'video' %}{%- if do_vision_count %}"
    "{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- set content = render_content(message.content, True) %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@lru_cache(maxsize=None)
def tokenizer_json(kind: str) -> str:
    """A byte-level BPE tokenizer ("llama": <s> BOS added; "qwen2": chatml, no BOS; "qwen2_vl": chatml with
    Qwen2-VL's vision tokens)."""
    specials = (["<unk>", "<s>", "</s>", "<pad>", "<image>"] if kind == "llama"
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + QWEN_VL_SPECIALS if kind == "qwen2_vl"
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    if kind == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def write_tokenizer(folder: Path, kind: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_json(kind))
    tok = Tokenizer.from_str(tokenizer_json(kind))
    if kind == "llama":
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "tokenizer_class": "PreTrainedTokenizerFast", "image_token": "<image>"}
    else:
        cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
               "tokenizer_class": "PreTrainedTokenizerFast", "image_token": "<image>"}
    if kind == "qwen2_vl":
        cfg["image_token"] = "<|image_pad|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ids = {t: tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<image>", "<|im_end|>", "<|endoftext|>",
                                           *QWEN_VL_SPECIALS)}
    return {"vocab_size": tok.get_vocab_size(), **{k: v for k, v in ids.items() if v is not None}}


def _text_config(kind: str, vocab: dict, tie: bool, rope_scaling=None, **over):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab["vocab_size"], max_position_embeddings=512,
                  tie_word_embeddings=tie, initializer_range=0.1)
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1e6, bos_token_id=None, eos_token_id=vocab["<|im_end|>"],
                           pad_token_id=vocab["<|endoftext|>"], **over)
    C = MistralConfig if kind == "mistral" else LlamaConfig
    extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
    return C(**common, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
             rms_norm_eps=1e-5, **extra, **over)


def _vision_config(kind: str, image_size: int, patch: int):
    from transformers import CLIPVisionConfig, SiglipVisionConfig
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=patch, initializer_range=0.1)
    return CLIPVisionConfig(**common, projection_dim=16) if kind == "clip" else SiglipVisionConfig(**common)


def _image_processor(kind: str, image_size: int, mode: str = "crop"):
    from transformers import CLIPImageProcessor, SiglipImageProcessor
    if kind == "siglip":
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                              "width": image_size})


def build_llava(folder: Path, *, vision="clip", text="llama", tie=False, feature_layer=-2, strategy="default",
                layout="saved", image_size=32, patch=8, seed=0, rope_scaling=None) -> Path:
    """Save a tiny LlavaForConditionalGeneration (+ processor) into folder; returns folder.

    layout: "saved" (what this transformers' save_pretrained writes), "legacy" (llava-hf names),
    "v5" (model.language_model.* / model.vision_tower.vision_model.*).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
    folder = Path(folder)
    kind = "llama" if text in ("llama", "mistral") else "qwen2"
    vocab = write_tokenizer(folder, kind)
    cfg = LlavaConfig(vision_config=_vision_config(vision, image_size, patch),
                      text_config=_text_config(text, vocab, tie, rope_scaling),
                      image_token_index=vocab["<image>"], vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                      tie_word_embeddings=tie, image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                     **{k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text())
                                        .items() if k.endswith("_token") and v})
    processor = LlavaProcessor(image_processor=_image_processor(vision, image_size), tokenizer=hf_tok,
                               patch_size=patch, vision_feature_select_strategy=strategy,
                               chat_template=LLAVA_TEMPLATE if kind == "llama" else QWEN_TEMPLATE,
                               num_additional_image_tokens=0 if vision == "siglip" else 1,
                               image_token="<image>")
    processor.save_pretrained(folder)
    if layout != "saved":
        rename_layout(folder, layout)
    return folder


def rename_layout(folder: Path, layout: str) -> None:
    """Rewrite model.safetensors' names from the saved mix into another layout."""
    path = folder / "model.safetensors"
    sd = load_file(path)
    out = {}
    for k, v in sd.items():
        if layout == "legacy":
            k = k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k
        elif layout == "v5":
            if k.startswith("language_model.model."):
                k = "model.language_model." + k[len("language_model.model."):]
            elif k.startswith("language_model.lm_head."):
                k = "lm_head." + k[len("language_model.lm_head."):]
            elif k.startswith("vision_tower."):
                k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
            elif k.startswith("multi_modal_projector."):
                k = "model." + k
        out[k] = v.contiguous()
    path.unlink()
    save_file(out, path, metadata={"format": "pt"})


def shard(folder: Path, n: int = 2) -> None:
    """Split model.safetensors into n shards with an index, as save_pretrained does for big models."""
    path = folder / "model.safetensors"
    sd = load_file(path)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    path.unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hf_model(folder: Path):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def hf_processor(folder: Path):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(folder)


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
QWEN_VL_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)   # 4 to 64 image tokens


def build_qwen2_vl(folder: Path, *, kind="qwen2_vl", tie=False, seed=0, mrope_section=(2, 3, 3),
                   layout="saved") -> Path:
    """Save a tiny Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (+ processor).
    layout: "saved" (this transformers' names: model.visual.*, model.language_model.*) or "legacy"
    (transformers 4.x: visual.*, model.layers.*, and a flat config)."""
    import transformers as T
    folder = Path(folder)
    vocab = write_tokenizer(folder, "qwen2_vl")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab["vocab_size"], max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section), "rope_theta": 1e6},
                bos_token_id=None, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                tie_word_embeddings=tie, initializer_range=0.1)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
        Config, Model = T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration
    else:   # window attention: 56-px windows are 2x2 merged tokens; block 1 attends fully
        vision = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      initializer_range=0.1)
        Config, Model = T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration
    ids = {k: vocab[t] for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                     ("vision_start_token_id", "<|vision_start|>"),
                                     ("vision_end_token_id", "<|vision_end|>"))}
    cfg = Config(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():       # random init leaves the tiny tower's output near zero: make images matter
        for name, p in model.named_parameters():
            if "visual" in name and p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                       **{k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text())
                                          .items() if k.endswith("_token") and v})
    image_processor = T.Qwen2VLImageProcessorPil(**QWEN_VL_PIXELS, patch_size=14, merge_size=2,
                                                 temporal_patch_size=2)
    image_processor.save_pretrained(folder)     # (the whole processor wants torchvision for its video half)
    (folder / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    if layout == "legacy":
        state = load_file(folder / "model.safetensors")
        renamed = {}
        for name, t in state.items():
            name = name.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
            renamed[name] = t
        save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
        raw = json.loads((folder / "config.json").read_text())
        flat = {k: v for k, v in raw.items() if k != "text_config"} | raw["text_config"]
        flat["model_type"] = kind
        flat.pop("rope_parameters", None)
        flat |= {"rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)}}
        (folder / "config.json").write_text(json.dumps(flat))
    return folder


def hf_qwen2_vl_processor(folder: Path):
    """transformers' Qwen2VLProcessor over the saved tokenizer and image processor, without a video processor
    (its class check imports torchvision, which the tests do without)."""
    from unittest import mock
    import transformers as T
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"),
                                       **{k: v for k, v in json.loads((Path(folder) / "tokenizer_config.json")
                                                                      .read_text()).items() if k.endswith("_token") and v})
    image_processor = T.Qwen2VLImageProcessorPil.from_pretrained(folder)
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return T.Qwen2VLProcessor(image_processor=image_processor, tokenizer=hf_tok, video_processor=None,
                                  chat_template=QWEN2_VL_TEMPLATE)


def hf_qwen2_vl(folder: Path):
    import transformers as T
    kind = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    Model = T.Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else T.Qwen2_5_VLForConditionalGeneration
    return Model.from_pretrained(folder, dtype=torch.float32).eval()


QWEN3_VL_PIXELS = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)   # 4 to 64 image tokens


def build_qwen3_vl(folder: Path, *, tie=False, seed=0, mrope_section=(4, 2, 2), deepstack=(0, 2)) -> Path:
    """Save a tiny Qwen3VLForConditionalGeneration (+ its image processor and chat template): a 3-block
    ViT over 16-px patches with a 4x4 learned position table (every test image resamples it) and
    DeepStack from blocks `deepstack`, a 3-layer Qwen3 decoder with head_dim 16 (not hidden/heads)."""
    import transformers as T
    folder = Path(folder)
    vocab = write_tokenizer(folder, "qwen2_vl")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=vocab["vocab_size"], max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section),
                                 "mrope_interleaved": True, "rope_theta": 5e6},
                bos_token_id=None, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                tie_word_embeddings=tie, initializer_range=0.1)
    vision = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack), initializer_range=0.1)
    ids = {k: vocab[t] for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                     ("vision_start_token_id", "<|vision_start|>"),
                                     ("vision_end_token_id", "<|vision_end|>"))}
    cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    torch.manual_seed(seed)
    model = T.Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():       # make images matter, and q/k norms and biases other than ones and zeros
        for name, p in model.named_parameters():
            if "visual" in name and p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith(("q_norm.weight", "k_norm.weight")) or ("visual" in name and p.dim() == 1):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    image_processor = T.Qwen2VLImageProcessorPil(**QWEN3_VL_PIXELS, patch_size=16, merge_size=2,
                                                 temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN3_VL_TEMPLATE)
    return folder


def hf_qwen3_vl_processor(folder: Path):
    """transformers' Qwen3VLProcessor over the saved tokenizer and image processor (no video processor)."""
    from unittest import mock
    import transformers as T
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"),
                                       **{k: v for k, v in json.loads((Path(folder) / "tokenizer_config.json")
                                                                      .read_text()).items() if k.endswith("_token") and v})
    image_processor = T.AutoImageProcessor.from_pretrained(folder)
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return T.Qwen3VLProcessor(image_processor=image_processor, tokenizer=hf_tok, video_processor=None,
                                  chat_template=QWEN3_VL_TEMPLATE)


def hf_qwen3_vl(folder: Path):
    import transformers as T
    return T.Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def build_llava_next(folder: Path, *, text="llama", feature_layer=-2, image_size=32, patch=8, seed=0,
                     pinpoints=NEXT_PINPOINTS) -> Path:
    """Save a tiny LlavaNextForConditionalGeneration (anyres tiling, LLaVA-1.6) + processor into folder."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, PreTrainedTokenizerFast)
    folder = Path(folder)
    kind = "llama" if text in ("llama", "mistral") else "qwen2"
    vocab = write_tokenizer(folder, kind)
    cfg = LlavaNextConfig(vision_config=_vision_config("clip", image_size, patch),
                          text_config=_text_config(text, vocab, False), image_token_index=vocab["<image>"],
                          vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                          image_grid_pinpoints=pinpoints, image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():       # a visible newline vector (HF's init is small)
        model.model.image_newline.normal_(0, 1.0)
    model.save_pretrained(folder)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                     **{k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text())
                                        .items() if k.endswith("_token") and v})
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_TEMPLATE if kind == "llama" else QWEN_TEMPLATE,
                                   image_token="<image>")
    processor.save_pretrained(folder)
    return folder


def ollama_store(root: Path, name: str, tag: str, layers: list[tuple[Path, str]]) -> Path:
    """Lay files out as `ollama pull` does: blobs named by sha256, a manifest listing them with their
    media types ("model", "projector") under manifests/registry.ollama.ai/library/NAME/TAG; returns root."""
    import hashlib
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    entries = []
    for path, media in layers:
        data = Path(path).read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
        entries.append({"mediaType": f"application/vnd.ollama.image.{media}", "digest": digest, "size": len(data)})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": entries}))
    return root


# SmolVLM's chat template (transformers' SmolVLMProcessor DEFAULT_CHAT_TEMPLATE: string or typed content)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                     "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]


def write_idefics3_tokenizer(folder: Path) -> dict:
    """A byte-level BPE with Idefics3 / SmolVLM's image tokens (tiles up to 6x6), no BOS added."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=IDEFICS3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return {"vocab_size": tok.get_vocab_size(), **{t: tok.token_to_id(t) for t in IDEFICS3_SPECIALS}}


def build_idefics3(folder: Path, *, kind="idefics3", tie=False, seed=0, longest_edge=96, tile=32) -> Path:
    """Save a tiny Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (+ its image processor,
    chat template and, for idefics3, the whole Idefics3Processor): a 2-layer SigLIP over 8-px patches of
    32-px frames, scale factor 2 (4 tokens a frame), a 2-layer Llama; images resized to `longest_edge` and
    cut into `tile`-px tiles (up to 3x3 + the global view by default)."""
    import transformers as T
    folder = Path(folder)
    vocab = write_idefics3_tokenizer(folder)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab["vocab_size"],
                max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1,
                bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<end_of_utterance>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, initializer_range=0.1)
    Config, Model = ((T.Idefics3Config, T.Idefics3ForConditionalGeneration) if kind == "idefics3"
                     else (T.SmolVLMConfig, T.SmolVLMForConditionalGeneration))
    cfg = Config(text_config=text, vision_config=vision, scale_factor=2, image_token_id=vocab["<image>"],
                 tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():       # make images matter; layer norms other than ones and zeros
        for name, p in model.named_parameters():
            if "vision_model" in name and p.dim() > 1:
                p.normal_(0, 0.2)
            elif "vision_model" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    ImageProcessor = T.Idefics3ImageProcessorPil if kind == "idefics3" else T.SmolVLMImageProcessorPil
    image_processor = ImageProcessor(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile})
    seq_len = (tile // 8) ** 2 // 4
    if kind == "idefics3":
        hf_tok = T.PreTrainedTokenizerFast.from_pretrained(folder)
        T.Idefics3Processor(image_processor=image_processor, tokenizer=hf_tok, image_seq_len=seq_len,
                            chat_template=SMOLVLM_TEMPLATE).save_pretrained(folder)
    else:                       # (SmolVLMProcessor wants a video processor, i.e. torchvision, to be saved)
        image_processor.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(SMOLVLM_TEMPLATE)
        (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": seq_len,
                                                                  "processor_class": "SmolVLMProcessor"}))
    return folder


def hf_idefics3_processor(folder: Path):
    """transformers' Idefics3Processor / SmolVLMProcessor over the saved files (SmolVLM's without a video
    processor and num2words, which only its video half needs)."""
    from unittest import mock
    import transformers as T
    folder = Path(folder)
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    hf_tok = T.PreTrainedTokenizerFast.from_pretrained(folder)
    seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    template = (folder / "chat_template.jinja").read_text()
    if kind == "idefics3":
        return T.Idefics3Processor(image_processor=T.Idefics3ImageProcessorPil.from_pretrained(folder),
                                   tokenizer=hf_tok, image_seq_len=seq_len, chat_template=template)
    from transformers.models.smolvlm import processing_smolvlm
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None), \
            mock.patch.object(processing_smolvlm, "num2words", str):
        processor = T.SmolVLMProcessor(image_processor=T.SmolVLMImageProcessorPil.from_pretrained(folder),
                                       tokenizer=hf_tok, video_processor=None, image_seq_len=seq_len,
                                       chat_template=template)
    from types import SimpleNamespace
    processor.video_processor = SimpleNamespace(num_frames=None, fps=None)     # apply_chat_template reads these
    return processor


def hf_idefics3(folder: Path):
    import transformers as T
    kind = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    Model = T.Idefics3ForConditionalGeneration if kind == "idefics3" else T.SmolVLMForConditionalGeneration
    return Model.from_pretrained(folder, dtype=torch.float32).eval()
