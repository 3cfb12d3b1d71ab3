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
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


def random_image(size, seed=0):
    """A (width, height) image of seeded uniform noise: pixels no processor leaves uniform."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def ask(text, *images):
    """One user turn: the images, then the text (the parts layout HF processors read)."""
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


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


# InternVL3-*-hf's chat template (chat_template.jinja): an image is one <IMG_CONTEXT>, which the processor
# expands to <img><IMG_CONTEXT>*N</img>
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                     "video_token": "<video>"}
INTERNVL_TILE = dict(image_size=32, patch_size=8, max_patches=6)   # 4x4 patches -> 2x2 = 4 tokens a tile


def _internvl_tokenizer(folder: Path):
    """The qwen2 tiny tokenizer with InternVL's image tokens added as specials, saved by transformers (its
    tokenizer_config.json names them in extra_special_tokens, as the InternVL3-*-hf checkpoints do)."""
    import transformers as T
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(tokenizer_json("qwen2"))
    tok.add_special_tokens(list(INTERNVL_SPECIALS.values()))
    (folder / "tokenizer.json").write_text(tok.to_str())
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", extra_special_tokens=dict(INTERNVL_SPECIALS))
    return hf_tok


def build_internvl(folder: Path, *, tie=True, seed=0, norm_type="layer_norm", qk_norm=False, feature_layer=-1,
                   mean_pooling=True, attention_bias=False, strategy="default") -> Path:
    """Save a tiny InternVLForConditionalGeneration (+ its processor's files): a 2-block InternViT over 32-px tiles of
    8-px patches (CLS + 16 patches), pixel-shuffled 2x2 into 4 tokens a tile, a 2-layer Qwen2 decoder; tiles
    up to max_patches=6 plus a thumbnail."""
    import transformers as T
    folder = Path(folder)
    hf_tok = _internvl_tokenizer(folder)
    vocab = hf_tok.get_vocab()
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=512,
                rope_theta=1e6, bos_token_id=None, eos_token_id=vocab["<|im_end|>"],
                pad_token_id=vocab["<|endoftext|>"], tie_word_embeddings=tie, initializer_range=0.1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=INTERNVL_TILE["image_size"], patch_size=INTERNVL_TILE["patch_size"], norm_type=norm_type,
                  use_qk_norm=qk_norm, use_mean_pooling=mean_pooling, attention_bias=attention_bias,
                  initializer_range=0.1)
    tokens = (INTERNVL_TILE["image_size"] // INTERNVL_TILE["patch_size"] // 2) ** 2
    cfg = T.InternVLConfig(text_config=text, vision_config=vision, image_token_id=vocab["<IMG_CONTEXT>"],
                           image_seq_length=tokens, vision_feature_layer=feature_layer,
                           vision_feature_select_strategy=strategy, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = T.InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():       # make images matter; layer scales, norms and biases other than constants
        for name, p in model.named_parameters():
            if "vision_tower" in name and p.dim() > 1:
                p.normal_(0, 0.2)
            elif "vision_tower" in name or "multi_modal_projector" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    image_processor = T.GotOcr2ImageProcessorPil(size={"height": INTERNVL_TILE["image_size"],
                                                       "width": INTERNVL_TILE["image_size"]},
                                                 max_patches=INTERNVL_TILE["max_patches"])
    image_processor.save_pretrained(folder)     # (the whole processor's save wants its torchvision video half)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": tokens,
                                                              "processor_class": "InternVLProcessor"}))
    (folder / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)
    return folder


def hf_internvl_processor(folder: Path):
    """transformers' InternVLProcessor over the saved tokenizer and image processor (no video processor: its
    class check imports torchvision)."""
    from unittest import mock
    import transformers as T
    hf_tok = T.AutoTokenizer.from_pretrained(folder)
    image_processor = T.GotOcr2ImageProcessorPil.from_pretrained(folder)
    seq = json.loads((Path(folder) / "processor_config.json").read_text()).get("image_seq_length", 256)
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return T.InternVLProcessor(image_processor=image_processor, tokenizer=hf_tok, video_processor=None,
                                   image_seq_length=seq, chat_template=INTERNVL_TEMPLATE)


def hf_internvl(folder: Path):
    import transformers as T
    return T.InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


# ---- Pixtral (LLaVA with a Pixtral ViT) and Mistral 3 ----------------------------------------------
PIXTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# mistral-community/pixtral-12b's chat template, shortened: an optional system prompt goes into the last user
# turn, images are [IMG] (the processor expands each into rows), assistant turns end with </s>
PIXTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST]' + system_message + '\n\n' }}{%- else %}{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is not string %}{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{{- chunk['text'] }}{%- elif chunk['type'] == 'image' %}{{- '[IMG]' }}"
    "{%- endif %}{%- endfor %}{%- else %}{{- message['content'] }}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for chunk in message['content'] %}{{- chunk['text'] }}{%- endfor %}{%- endif %}"
    "{{- eos_token }}{%- endif %}{%- endfor %}"
)


def _write_pixtral_tokenizer(folder: Path) -> dict:
    """A byte-level BPE with Mistral's control tokens ([INST], [IMG], [IMG_BREAK], [IMG_END]) and a <s> BOS."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=PIXTRAL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return {"vocab_size": tok.get_vocab_size(), **{t: tok.token_to_id(t) for t in PIXTRAL_SPECIALS}}


def build_pixtral(folder: Path, *, kind="llava", tie=False, seed=0, longest_edge=96, patch=8, merge=2) -> Path:
    """Save a tiny Pixtral: kind "llava" (Pixtral-12B's LlavaForConditionalGeneration with a Pixtral ViT, one
    token per 8-px patch) or "mistral3" (Mistral3ForConditionalGeneration: RMS norm + a `merge` x `merge`
    patch merger before the projector); a 3-layer 2-D-RoPE ViT and a 2-layer Mistral decoder, the image
    processor resizing the longest edge to `longest_edge` px, chat template and processor_config.json."""
    import transformers as T
    folder = Path(folder)
    vocab = _write_pixtral_tokenizer(folder)
    text = dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab["vocab_size"],
                max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                tie_word_embeddings=tie, initializer_range=0.1)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=longest_edge, patch_size=patch, hidden_act="silu",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}, initializer_range=0.1)
    if kind == "llava":
        cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["[IMG]"],
                            vision_feature_layer=-1, vision_feature_select_strategy="full",
                            projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=tie)
        Model, merge = T.LlavaForConditionalGeneration, 1
    else:
        cfg = T.Mistral3Config(vision_config=vision, text_config=text, image_token_index=vocab["[IMG]"],
                               vision_feature_layer=-1, spatial_merge_size=merge, projector_hidden_act="gelu",
                               multimodal_projector_bias=False, tie_word_embeddings=tie)
        Model = T.Mistral3ForConditionalGeneration
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():       # random init leaves the tiny tower's output near zero: make images matter
        for name, p in model.named_parameters():
            if "vision_tower" in name and p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    image_processor = T.PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                                 patch_size={"height": patch, "width": patch})
    image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(PIXTRAL_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": merge,
         "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}))
    return folder


def hf_pixtral_processor(folder: Path):
    """transformers' PixtralProcessor over the saved tokenizer and PIL image processor (its class check and
    backend guard want torchvision, which the tests do without)."""
    from unittest import mock
    import transformers as T
    import sys
    import types
    from transformers.models.pixtral import image_processing_pil_pixtral as pil
    if "transformers.models.pixtral.processing_pixtral" not in sys.modules:
        # processing_pixtral imports its resize helper from the torchvision image processor's module; the PIL
        # module has the same function
        stub = types.ModuleType("transformers.models.pixtral.image_processing_pixtral")
        stub.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules.setdefault(stub.__name__, stub)
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    folder = Path(folder)
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                       **{k: v for k, v in json.loads((folder / "tokenizer_config.json")
                                                                      .read_text()).items() if k.endswith("_token") and v})
    settings = json.loads((folder / "processor_config.json").read_text())
    image_processor = T.PixtralImageProcessorPil.from_pretrained(folder)
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return PixtralProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=PIXTRAL_TEMPLATE,
                                  patch_size=settings["patch_size"], spatial_merge_size=settings["spatial_merge_size"])


def hf_pixtral(folder: Path):
    import transformers as T
    kind = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    Model = T.LlavaForConditionalGeneration if kind == "llava" else T.Mistral3ForConditionalGeneration
    return Model.from_pretrained(folder, dtype=torch.float32).eval()


MLLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|finetune_right_pad_id|>", "<|python_tag|>"]
# Llama-3.2-*-Vision-Instruct's chat template without its tool and date branches
MLLAMA_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _mllama_tokenizer(folder: Path, llama3_split: bool = False) -> dict:
    """A byte-level BPE with Llama 3's specials (BOS added) and `<|image|>` as the last id, past the text
    vocabulary as in the real checkpoints (128256). llama3_split: Llama 3's own pre-tokenizer (its split
    regex, then byte-level without GPT-2's regex; merges ignored for whole-word pieces), as the published
    checkpoint has it."""
    tok = Tokenizer(models.BPE(ignore_merges=llama3_split))
    if llama3_split:
        from foveal.weights.gguf_tokenizer import LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=MLLAMA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_special_tokens(["<|image|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return {t: tok.token_to_id(t) for t in [*MLLAMA_SPECIALS, "<|image|>"]} | {"size": tok.get_vocab_size()}


def build_mllama(folder: Path, *, seed=0, max_num_tiles=4, tile=28, llama3_split=False) -> Path:
    """Save a tiny MllamaForConditionalGeneration (+ MllamaImageProcessorPil, chat template): 28-px tiles of
    4 patches (+ class token), up to 4 tiles, a 3-layer local and 2-layer gated global ViT with layers 0 and 2
    concatenated, a 4-layer Llama decoder with cross-attention at layers 1 and 3. Every gate is non-zero
    (HF initialises them to zero, which would hide the images)."""
    import transformers as T
    folder = Path(folder)
    ids = _mllama_tokenizer(folder, llama3_split)
    vocab = ids["<|image|>"]            # the text vocabulary ends before <|image|>
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, cross_attention_layers=[1, 3], max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rms_norm_eps=1e-5,
                bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                pad_token_id=ids["<|finetune_right_pad_id|>"], initializer_range=0.1)
    vision = dict(hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=4, intermediate_size=48,
                  vision_output_dim=96, image_size=tile, patch_size=14, max_num_tiles=max_num_tiles,
                  intermediate_layers_indices=[0, 2], initializer_range=0.1,
                  supported_aspect_ratios=[list(r) for r in _mllama_ratios(max_num_tiles)])
    cfg = T.MllamaConfig(text_config=text, vision_config=vision, image_token_index=ids["<|image|>"])
    torch.manual_seed(seed)
    model = T.MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.rand_like(p) * 0.6 + 0.4)
            elif "vision_model" in name and p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith(("norm.weight", "class_embedding")) or ("vision_model" in name and p.dim() == 1):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    T.MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_num_tiles).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(MLLAMA_TEMPLATE)
    return folder


def _mllama_ratios(max_tiles: int) -> list[tuple[int, int]]:
    return [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


def hf_mllama_processor(folder: Path):
    """transformers' MllamaProcessor over the saved tokenizer and the image processor AutoImageProcessor picks."""
    from unittest import mock
    import transformers as T
    cfg = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"),
                                       **{k: v for k, v in cfg.items() if k.endswith("_token") and v})
    image_processor = T.AutoImageProcessor.from_pretrained(folder)
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return T.MllamaProcessor(image_processor=image_processor, tokenizer=hf_tok, chat_template=MLLAMA_TEMPLATE)


def hf_mllama(folder: Path):
    import transformers as T
    return T.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


# ---- Gemma 3 ---------------------------------------------------------------------------------
GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]   # Gemma's order where it has one: pad 0, eos 1, bos 2
# Gemma 3's chat template (google/gemma-3-4b-it), image parts as <start_of_image>
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
GEMMA3_TOKENS = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")


def _gemma3_tokenizer(folder: Path) -> dict:
    """A byte-level BPE with Gemma's specials and a <bos> post-processor (Gemma's tokenizer adds one)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=GEMMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3 + ["\n\n model user <start_of_turn> <end_of_turn>"] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str())
    cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
           "tokenizer_class": "GemmaTokenizer", **GEMMA3_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {"vocab_size": tok.get_vocab_size(), **{t: tok.token_to_id(t) for t in GEMMA3_SPECIALS}}


def _gemma3_sentencepiece_tokenizer(folder: Path) -> dict:
    """Gemma's own tokenizer.json form (transformers' GemmaTokenizer): BPE with byte fallback over `▁`-spelled
    pieces, `<0xXX>` byte pieces, a Replace(" ", "▁") normalizer without a prefix space, merges in piece-score
    order (how a SentencePiece model converts), <bos> added; pad 0, eos 1, bos 2, unk 3, then the turn and image
    specials, `<image_soft_token>` last (262144 in the real vocabulary), and one plain added token."""
    from transformers.tokenization_utils_base import generate_merges
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer.train_from_iterator(CORPUS * 3 + ["\n\n model user"] * 3,
                                trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = trainer.get_vocab()
    pieces = sorted(learned, key=learned.get)
    specials = [t for t in GEMMA3_SPECIALS if t != "<image_soft_token>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<mask>", "<image_soft_token>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges({p: vocab[p] for p in pieces}, {p: -float(vocab[p]) for p in pieces})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in [*specials, "<image_soft_token>"]])
    tok.add_tokens([AddedToken("<mask>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str())
    cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
           "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, **GEMMA3_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {"vocab_size": tok.get_vocab_size(), **{t: vocab[t] for t in GEMMA3_SPECIALS}}


def build_gemma3(folder: Path, *, tie=True, seed=0, sliding_window=8, image_size=32, patch=8, mm_tokens=4,
                 layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                 rope_scaling=None, query_pre_attn_scalar=24, tokenizer="bpe") -> Path:
    """Save a tiny Gemma3ForConditionalGeneration (+ its image processor and chat template): a 2-layer SigLIP
    over 32-px images in 8-px patches (4x4, average-pooled to 2x2 = `mm_tokens` soft tokens), a 3-layer Gemma 3
    decoder (sliding, global, sliding; window 8, shorter than every prompt) with head_dim 16, query_pre_attn_scalar
    24, a linearly scaled global RoPE (factor 8, as gemma-3-4b) and the local base 10,000. tokenizer="sentencepiece":
    Gemma's own tokenizer form (byte fallback, `▁` pieces) instead of a byte-level BPE."""
    import transformers as T
    folder = Path(folder)
    vocab = _gemma3_sentencepiece_tokenizer(folder) if tokenizer == "sentencepiece" else _gemma3_tokenizer(folder)
    rope = {"full_attention": rope_scaling or {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    text = T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              query_pre_attn_scalar=query_pre_attn_scalar,
                              vocab_size=vocab["vocab_size"], max_position_embeddings=512,
                              sliding_window=sliding_window, layer_types=list(layer_types), rope_parameters=rope,
                              bos_token_id=vocab["<bos>"], eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]],
                              pad_token_id=vocab["<pad>"], tie_word_embeddings=tie, initializer_range=0.1)
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=image_size, patch_size=patch, vision_use_head=False,
                                  initializer_range=0.1)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                         boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                         image_token_index=vocab["<image_soft_token>"], tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = T.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():       # HF zeroes the (1 + w) norms and the projection: make them matter
        for name, p in model.named_parameters():
            if "norm" in name and "vision" not in name:
                p.normal_(0, 0.3)
            elif "language_model" in name:     # small weights: greedy text that does not repeat one token
                p.normal_(0, 0.02)
            elif "mm_input_projection_weight" in name:
                p.normal_(0, 0.3)
            elif "vision" in name and p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    image_processor = T.Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(GEMMA3_TEMPLATE)
    return folder


def hf_gemma3_processor(folder: Path):
    import transformers as T
    folder = Path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                       **{k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
                                       extra_special_tokens={k: config[k] for k in GEMMA3_TOKENS})
    mm_tokens = json.loads((folder / "config.json").read_text())["mm_tokens_per_image"]
    return T.Gemma3Processor(image_processor=T.Gemma3ImageProcessorPil.from_pretrained(folder), tokenizer=hf_tok,
                             chat_template=GEMMA3_TEMPLATE, image_seq_length=mm_tokens)


def hf_gemma3(folder: Path):
    import transformers as T
    return T.Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


# LLaVA-OneVision: 30-px SigLIP tiles in 7-px patches (a 4x4 grid: the conv floors, as 384 / 14 does on the real
# model), tile grids up to 3x3, and a budget of 4 tiles' features (anyres_max_4) so a 3x3 grid is downscaled
ONEVISION_PINPOINTS = [[30, 30], [30, 60], [60, 30], [60, 60], [30, 90], [90, 30], [60, 90], [90, 60], [90, 90]]
# llava-hf/llava-onevision-qwen2-*-hf's chat template (chat_template.json), as the hub ships it
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_llava_onevision(folder: Path, *, seed=0, tie=False, pinpoints=ONEVISION_PINPOINTS,
                          aspect="anyres_max_4", feature_layer=-1, strategy="full") -> Path:
    """Save a tiny LlavaOnevisionForConditionalGeneration (SigLIP tower, Qwen2 LM) + its image processor and
    chat template (the full processor wants torchvision for its video half: see hf_llava_onevision_processor)."""
    import transformers as T
    folder = Path(folder)
    vocab = write_tokenizer(folder, "qwen2")
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=30, patch_size=7, vision_use_head=False, initializer_range=0.1)
    cfg = T.LlavaOnevisionConfig(vision_config=vision, text_config=_text_config("qwen2", vocab, tie),
                                 image_token_index=vocab["<image>"], image_grid_pinpoints=pinpoints,
                                 vision_aspect_ratio=aspect, vision_feature_layer=feature_layer,
                                 vision_feature_select_strategy=strategy, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = T.LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():       # a visible newline vector, and a tower whose output is not near zero
        model.model.image_newline.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if "vision_tower" in name and p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    T.LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30}, image_grid_pinpoints=pinpoints,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (30 // 7) ** 2,
        "vision_feature_select_strategy": strategy, "vision_aspect_ratio": aspect, "image_token": "<image>"}))
    (folder / "chat_template.jinja").write_text(ONEVISION_TEMPLATE)
    return folder


def hf_llava_onevision_processor(folder: Path):
    """transformers' LlavaOnevisionProcessor over the saved tokenizer and image processor, without a video
    processor (its class check imports torchvision, which the tests do without)."""
    from unittest import mock
    import transformers as T
    folder = Path(folder)
    hf_tok = T.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                       **{k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text())
                                          .items() if k.endswith("_token") and v})
    settings = json.loads((folder / "processor_config.json").read_text())
    image_processor = T.LlavaOnevisionImageProcessorPil.from_pretrained(folder)
    with mock.patch.object(T.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return T.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=hf_tok, video_processor=None,
                                         chat_template=ONEVISION_TEMPLATE,
                                         num_image_tokens=settings["num_image_tokens"],
                                         vision_feature_select_strategy=settings["vision_feature_select_strategy"],
                                         vision_aspect_ratio=settings["vision_aspect_ratio"])


def hf_llava_onevision(folder: Path):
    import transformers as T
    return T.LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


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
