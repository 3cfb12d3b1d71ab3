"""The model foveal uses when none is named, and a tiny random model for demos and benchmarks.

The trained bundled model lives in `foveal/assets/default-model/` (installed as package data): the
output of `foveal train recipe shapes`, a LLaVA (CLIP ViT + Llama) trained on the synthetic shapes
world. `bundled_model_path()` finds it (or says it is missing, in a source tree without it), and
`build_random_model()` writes a deterministic random-weight LLaVA in HF format for tests and demos.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ProjectorConfig, RopeConfig, TextConfig, VisionConfig, VLMConfig
from .errors import ModelNotFoundError

ASSET_DIR = Path(__file__).parent / "assets" / "default-model"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# LLaVA-1.5's template (processing/prompt.py), with the space after "ASSISTANT:" inside the
# {% generation %} span: it renders the same text, but where the answer's first token is a lone space
# (BPE has no "Ġ9" merge in a 512-token vocabulary) that token is a training target. Outside the span
# it never was, so a model never learnt to write it and read "9CE" as " ACE" (measured: README).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ':' }}"
    "{% if message['role'] != 'assistant' or message['content'] is string %}{{ ' ' }}{% endif %}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ (' ' if loop.first else '') + content['text'] + ' ' }}"
    "{% endgeneration %}{% else %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def bundled_model_path() -> Path:
    if (ASSET_DIR / "config.json").exists():
        return ASSET_DIR
    raise ModelNotFoundError(
        "no model was named and foveal has no bundled model installed yet; pass a model folder "
        "(for a demo: `python -m foveal.bundled /tmp/foveal-tiny` writes a tiny random one)")


def byte_level_tokenizer() -> str:
    """A byte-level tokenizer (256 byte tokens + specials): encodes any text, needs no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def random_config(vocab_size: int = 261, image_size: int = 64, patch: int = 8) -> VLMConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=image_size, patch_size=patch)
    text = TextConfig(model_type="llama", vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                      bos_token_id=1, eos_token_id=[2], pad_token_id=3)
    return VLMConfig(text=text, vision=vision,
                     projector=ProjectorConfig(in_features=vision.hidden_size, out_features=text.hidden_size),
                     image_token_id=4, vision_feature_layer=-2)


def build_random_model(folder: Path, seed: int = 0, cfg: VLMConfig | None = None) -> Path:
    """Write a deterministic random-weight LLaVA checkpoint (HF format) into folder."""
    from .models.vlm import VisionLanguageModel
    from .weights.save import save_checkpoint
    cfg = cfg or random_config()
    torch.manual_seed(seed)
    model = VisionLanguageModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif p.dim() >= 2 or name.endswith("class_embedding"):
                p.normal_(0.0, 0.05)
            else:
                p.zero_()
    size = cfg.vision.image_size
    image_processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                       "crop_size": {"height": size, "width": size}, "do_center_crop": True}
    return save_checkpoint(model, cfg, folder, tokenizer_json=byte_level_tokenizer(),
                           tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                             "pad_token": "<pad>", "image_token": "<image>",
                                             "tokenizer_class": "PreTrainedTokenizerFast"},
                           chat_template=CHAT_TEMPLATE, image_processor=image_processor)


if __name__ == "__main__":
    import sys
    print(build_random_model(Path(sys.argv[1] if len(sys.argv) > 1 else "foveal-tiny")))
