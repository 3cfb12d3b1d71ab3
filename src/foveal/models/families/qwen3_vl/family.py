"""The Qwen3-VL family (`Qwen3VLForConditionalGeneration`, model_type qwen3_vl): images only.

A ViT over 16-px patches with a learned position table resampled to each grid (vision.py); a Qwen3
decoder (models.text with per-head q/k RMSNorm) whose M-RoPE interleaves the temporal / height /
width rows over the frequencies; DeepStack: features of a few ViT blocks, each through its own
merger, are added to the hidden states at the image tokens after the first decoder layers.

Design decisions:
- What Qwen2-VL already has is reused from the qwen2_vl package: the vision config (kind qwen3_vl),
  the processor (smart_resize budget, `<|vision_start|><|image_pad|>...<|vision_end|>` expansion,
  rope_index with kind qwen3_vl) and the config dataclass. transformers 5.25's AutoImageProcessor
  gives Qwen3-VL the same `Qwen2VLImageProcessorPil` (without torchvision), so absent processor keys
  take that class's defaults (14-px patches, refused against the 16-px tower with a ConfigError).
- Absent config keys take transformers 5.25's Qwen3VLConfig / Qwen3VLTextConfig class defaults. HF's
  text rotary class always interleaves (it ignores `mrope_interleaved`), so the decoder always does.
- DeepStack reaches the decoder without the engine knowing of it: `encode` returns, per image, the
  merged embedding and the deepstack features side by side, (n, D * (1 + k)), so the engine's
  embedding cache keeps them together; `embed` writes the first D columns into the token embeddings
  and keeps the rest with the image mask; the next `forward` (the prefill) hands them to the decoder
  as per-layer additions, sliced to the tokens it prefills (after a reused prefix), and forgets
  them. Decode steps never see them (as in HF, whose deepstack runs only with pixel inputs).
- Checkpoint names: `model.visual.*` -> `visual.*`; the decoder's are the shared rules'
  (`model.language_model.*`); `lm_head`.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

from .... import config as C
from ....errors import ConfigError, PromptError
from ..qwen2_vl import family as qwen2
from ..qwen2_vl.config import QwenVisionConfig, mrope_section
from ..qwen2_vl.family import QwenVLConfig, QwenVLModel, QwenVLProcessor
from ..qwen2_vl.image_processing import IMAGE_DEFAULTS, image_token_count
from .vision import Qwen3VisionTower

NAME = "qwen3_vl"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
# transformers 5.25's Qwen3VLTextConfig class defaults (rope_theta: its default_theta)
TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                     max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_theta=500000.0, attention_bias=False, mlp_bias=False, bos_token_id=None,
                     eos_token_id=None)
TOKEN_DEFAULTS = qwen2.TOKEN_DEFAULTS     # Qwen3VLConfig's are Qwen2-VL's


def config(raw: dict) -> QwenVLConfig:
    if raw.get("model_type") != NAME:
        raise ConfigError(f"the Qwen3-VL family reads model_type qwen3_vl, not {raw.get('model_type')!r}")
    text = raw.get("text_config") or {}
    vision = raw.get("vision_config") or {}
    for key, value in (("text_config", text), ("vision_config", vision)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object")
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope", None):
        raise ConfigError(f"text_config.rope_parameters.rope_type {rope_type!r} is not supported for Qwen3-VL "
                          f"(only the default M-RoPE)")
    theta = rope.get("rope_theta", text.get("rope_theta", TEXT_DEFAULTS["rope_theta"]))
    if text.get("attention_bias"):   # HF puts a bias on o_proj too then; no checkpoint does
        raise ConfigError("text_config.attention_bias=true is not supported for Qwen3-VL (its o_proj would "
                          "carry a bias too); Qwen3-VL checkpoints have none")
    plain = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta", "head_dim")}
    head_dim = text.get("head_dim") or TEXT_DEFAULTS["head_dim"]
    cfg_text = C.text_config_from_hf(plain | {"model_type": "qwen3", "head_dim": head_dim,
                                              "rope_parameters": {"rope_type": "default", "rope_theta": theta}},
                                     defaults=TEXT_DEFAULTS)
    cfg_text.qk_norm = True
    cfg_text.mrope_interleaved = True
    cfg_text.sliding_window = None
    cfg_text.tie_word_embeddings = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    cfg_text.mrope_section = mrope_section({"rope_parameters": rope}, cfg_text.head_dim, NAME)
    tokens = {k: raw.get(k, v) for k, v in TOKEN_DEFAULTS.items()}
    for key, value in tokens.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < cfg_text.vocab_size:
            raise ConfigError(f"{key} {value!r} is not a token id of the {cfg_text.vocab_size}-token vocabulary")
    vcfg = QwenVisionConfig.from_hf(vision, NAME)
    if vcfg.out_width != cfg_text.hidden_size:
        raise ConfigError(f"vision_config.out_hidden_size ({vcfg.out_width}) differs from the language model's "
                          f"hidden_size ({cfg_text.hidden_size})")
    indexes = vcfg.deepstack_visual_indexes
    if len(set(indexes)) != len(indexes):
        raise ConfigError(f"vision_config.deepstack_visual_indexes {list(indexes)} names a block twice")
    if len(indexes) > cfg_text.num_hidden_layers:
        raise ConfigError(f"vision_config.deepstack_visual_indexes has {len(indexes)} entries, but the decoder has "
                          f"only {cfg_text.num_hidden_layers} layers to add them after (one layer each)")
    return QwenVLConfig(NAME, (raw.get("architectures") or [ARCHITECTURE])[0], cfg_text, vcfg,
                        tokens["image_token_id"], tokens["video_token_id"], tokens["vision_start_token_id"])


def complete(cfg: QwenVLConfig, ck, vision_tower=None) -> None:
    qwen2.complete(cfg, ck, vision_tower)       # model.visual.* -> visual.*


def build(cfg: QwenVLConfig) -> "Qwen3VLModel":
    return Qwen3VLModel(cfg)


def processor(cfg: QwenVLConfig, ck, image_mode: str | None = None) -> QwenVLProcessor:
    return qwen2.processor(cfg, ck, image_mode)


def describe(cfg: QwenVLConfig, processor: QwenVLProcessor | None = None) -> dict:
    """As Qwen2-VL's; without a processor the budget is the default one at this tower's patch size."""
    ipc = (processor.image_config if processor is not None
           else replace(IMAGE_DEFAULTS, patch_size=cfg.vision.patch_size))
    d = qwen2.describe(cfg, SimpleNamespace(image_config=ipc))
    d.update(family=NAME, vision_tower="qwen3_vl_vision", projector="patch_merger+deepstack",
             deepstack_visual_indexes=list(cfg.vision.deepstack_visual_indexes),
             image_tokens_per_image=image_token_count(336, 336, ipc))
    return d


plan_complete = qwen2.plan_complete
hf_name = qwen2.hf_name
config_to_hf = qwen2.config_to_hf


def plan_vision(cfg: QwenVLConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor: QwenVLProcessor | None = None) -> tuple[int, int, list[str]]:
    """As Qwen2-VL's, plus the DeepStack rows each image's embedding carries (cached with it)."""
    per_image, activations, notes = qwen2.plan_vision(cfg, images, dbytes, image_processor, processor)
    extra = images * per_image * cfg.vision.out_width * len(cfg.vision.deepstack_visual_indexes) * dbytes * 2
    return per_image, activations + extra, notes


class Qwen3VLModel(QwenVLModel):
    """Qwen2-VL's model with Qwen3-VL's tower; `encode` gives each image's rows (t*h*w / merge^2,
    D * (1 + len(deepstack))): the merged embedding, then each deepstack feature, so the engine's
    embedding cache keeps them together."""
    tower = Qwen3VisionTower
    trainable = False       # the trainer's loss does not carry DeepStack's per-layer rows yet

    def __init__(self, cfg: QwenVLConfig):
        super().__init__(cfg)
        self._deepstack = None        # (image mask (B, T), [rows (n, D)] per decoder layer) until the prefill

    def _run_tower(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        merged, deepstack = self.visual(x, grid)
        return torch.cat([merged, *deepstack], dim=-1)

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the merged image embedding at image_mask; keeps the deepstack rows for the
        prefill that follows."""
        self._deepstack = None
        if image_embeds is None:
            return super().embed(input_ids, image_mask, image_embeds)
        D, k = self.cfg.text.hidden_size, len(self.cfg.vision.deepstack_visual_indexes)
        if image_embeds.shape[-1] != D * (1 + k):
            raise PromptError(f"Qwen3-VL image embeddings must be {D * (1 + k)} wide (the merged embedding and "
                              f"{k} deepstack features of {D}), got {image_embeds.shape[-1]}")
        main, *stack = image_embeds.split(D, dim=-1)
        embeds = super().embed(input_ids, image_mask, main)
        if k and image_mask is not None and bool(image_mask.any()):
            self._deepstack = (image_mask, [s.reshape(-1, D) for s in stack])
        return embeds

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                start: int | None = None, layer_additions=None) -> torch.Tensor:
        """The prefill after `embed`: the deepstack rows of the tokens [start, start + T) go in as additions
        after the first decoder layers; then they are forgotten."""
        pending, self._deepstack = self._deepstack, None
        if pending is not None and layer_additions is None:
            layer_additions = self._deepstack_window(*pending, 0 if start is None else start, embeds.shape[1])
        return super().forward(embeds, input_pos, last_only, start, layer_additions)

    @staticmethod
    def _deepstack_window(mask: torch.Tensor, stack: list[torch.Tensor], start: int, length: int):
        """The additions for tokens [start, start + length) of the prompt embed() saw (mask (B, T_prompt))."""
        if start == 0 and length == mask.shape[1]:
            return [(mask, rows) for rows in stack]
        if mask.shape[0] != 1:
            raise PromptError("a prefill after a reused prefix takes one sequence, not a batch")
        window = mask[:, start:start + length]
        before, inside = int(mask[:, :start].sum()), int(window.sum())
        if not inside:
            return None
        return [(window, rows[before:before + inside]) for rows in stack]
