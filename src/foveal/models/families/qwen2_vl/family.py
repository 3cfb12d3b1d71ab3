"""The Qwen2-VL family: Qwen2-VL and Qwen2.5-VL (dynamic resolution, M-RoPE).

A ViT over 14-px patches at the image's own (resized) size, 2x2 patches merged into one LM
token (vision.py); a Qwen2 decoder (models.text) whose RoPE takes three position rows,
temporal / height / width (`mrope_section`), computed per prompt (positions.py); images resized
to multiples of 28 within a pixel budget (image_processing.py).

Design decisions:
- The config maps both of HF's shapes: transformers 5's nested `text_config` and the flat
  4.x one, with Qwen2VLTextConfig's class defaults for absent keys. `mrope_section` is checked
  against the head size; a tied head is tied whether the flag sits at the top or in text_config
  (transformers 5 reads both).
- Checkpoint names: `model.visual.*` (v5) and `visual.*` (4.x) become `visual.*`; the decoder's
  names are the LLaVA rules' (`model.language_model.*`, `model.layers.*`).
- An image is `<|vision_start|><|image_pad|>...<|vision_end|>`: the chat template writes one
  `<|image_pad|>` and the prompt builder expands it to the image's token count, known from
  its size before any pixel is read.
- The first generated token's position is max(prompt positions) + 1 (HF's rope delta folded in);
  a decode step's position is one scalar for the three rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .... import config as C
from ....errors import ConfigError
from ....processing.images import load_image
from ....processing.prompt import PromptBuilder, normalize_messages
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared
from ...vlm import DecoderVLM
from .config import QwenVisionConfig, mrope_section
from .positions import rope_index
from .image_processing import IMAGE_DEFAULTS, QwenProcessorConfig, image_grid, image_token_count, process_images
from .vision import QwenVisionTower

NAME = "qwen2_vl"
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
# transformers 5.25's Qwen2VLTextConfig / Qwen2_5_VLTextConfig class defaults (the same for both)
TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
                     max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     rope_theta=1000000.0, attention_bias=True, mlp_bias=False, bos_token_id=151643,
                     eos_token_id=151645)
TOKEN_DEFAULTS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653)
IMAGE_TOKEN = "<|image_pad|>"


@dataclass
class QwenVLConfig:
    kind: str                    # qwen2_vl | qwen2_5_vl | qwen3_vl (the qwen3_vl family builds it too)
    architecture: str
    text: C.TextConfig           # with mrope_section
    vision: QwenVisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int


def config(raw: dict) -> QwenVLConfig:
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(f"the Qwen2-VL family reads model_type qwen2_vl or qwen2_5_vl, not {kind!r}")
    text = raw.get("text_config")
    if text is None:        # a flat 4.x config: the decoder's keys sit at the top
        text = {k: v for k, v in raw.items() if k != "vision_config"}
    if not isinstance(text, dict):
        raise ConfigError("text_config must be a JSON object")
    vision = raw.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise ConfigError("vision_config must be a JSON object")
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or raw.get("rope_scaling") or {})
    theta = rope.get("rope_theta", text.get("rope_theta", raw.get("rope_theta", TEXT_DEFAULTS["rope_theta"])))
    kind_of_rope = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = "default" if kind_of_rope in ("mrope", "default", None) else kind_of_rope
    rope.pop("type", None)
    rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    rope["rope_theta"] = theta
    plain = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    cfg_text = C.text_config_from_hf(plain | {"model_type": "qwen2", "attention_bias": True,
                                              "rope_parameters": rope}, defaults=TEXT_DEFAULTS)
    cfg_text.attention_bias = True            # Qwen2-VL's q/k/v always carry a bias
    cfg_text.sliding_window = text.get("sliding_window") if text.get("use_sliding_window") else None
    cfg_text.tie_word_embeddings = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    cfg_text.mrope_section = mrope_section(text | ({"rope_parameters": text.get("rope_parameters")
                                                    or text.get("rope_scaling") or raw.get("rope_scaling")}),
                                           cfg_text.head_dim, kind)
    tokens = {k: raw.get(k, text.get(k, v)) for k, v in TOKEN_DEFAULTS.items()}
    for key, value in tokens.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < cfg_text.vocab_size:
            raise ConfigError(f"{key} {value!r} is not a token id of the {cfg_text.vocab_size}-token vocabulary")
    vcfg = QwenVisionConfig.from_hf(vision, kind)
    if vcfg.out_width != cfg_text.hidden_size:
        raise ConfigError(f"vision_config's output width ({vcfg.out_width}) differs from the language model's "
                          f"hidden_size ({cfg_text.hidden_size})")
    return QwenVLConfig(kind, (raw.get("architectures") or [ARCHITECTURES[kind]])[0], cfg_text, vcfg,
                        tokens["image_token_id"], tokens["video_token_id"], tokens["vision_start_token_id"])


def complete(cfg: QwenVLConfig, ck: Checkpoint, vision_tower=None) -> None:
    """The tower's names: `model.visual.*` (transformers 5) -> `visual.*` (4.x and this module)."""
    for name in [n for n in ck.sources if n.startswith("model.visual.")]:
        ck.sources[name[len("model."):]] = ck.sources.pop(name)


def build(cfg: QwenVLConfig) -> "QwenVLModel":
    return QwenVLModel(cfg)


def processor(cfg: QwenVLConfig, ck: Checkpoint, image_mode: str | None = None) -> "QwenVLProcessor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to a Qwen2-VL model: it keeps each image's "
                          f"aspect at its own resolution (set a pixel budget instead)")
    tokenizer = ck.tokenizer
    if tokenizer.token_id(IMAGE_TOKEN) != cfg.image_token_id:
        raise ConfigError(f"config image_token_id {cfg.image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                          f"({tokenizer.token_id(IMAGE_TOKEN)})")
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template): a Qwen2-VL prompt cannot be built without it")
    image_config = QwenProcessorConfig.from_hf(ck.image_processor or {})
    if (image_config.patch_size, image_config.merge_size, image_config.temporal_patch_size) != (
            cfg.vision.patch_size, cfg.vision.spatial_merge_size, cfg.vision.temporal_patch_size):
        raise ConfigError(f"the image processor cuts {image_config.patch_size}-px patches merged "
                          f"{image_config.merge_size}x{image_config.merge_size} over {image_config.temporal_patch_size} "
                          f"frame(s), but the vision tower (config.json) takes {cfg.vision.patch_size}-px patches "
                          f"merged {cfg.vision.spatial_merge_size}x{cfg.vision.spatial_merge_size} over "
                          f"{cfg.vision.temporal_patch_size}")
    prompt = PromptBuilder(tokenizer, ck.template, cfg.image_token_id, 1, IMAGE_TOKEN)
    return QwenVLProcessor(cfg, prompt, image_config)


def describe(cfg: QwenVLConfig, processor: "QwenVLProcessor | None" = None) -> dict:
    """image_tokens_per_image: a 336x336 image's count (the count follows each image's size, between the
    processor's min_pixels and max_pixels over 28x28 px per token)."""
    ipc = processor.image_config if processor is not None else IMAGE_DEFAULTS
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": cfg.kind,
        "language_model": cfg.text.model_type,
        "vision_tower": f"{cfg.kind}_vision",
        "vision_family": cfg.kind,
        "projector": "patch_merger",
        "image_size": None,
        "patch_size": cfg.vision.patch_size,
        "vision_layers": cfg.vision.depth,
        "vision_hidden_size": cfg.vision.width,
        "image_tokens_per_image": image_token_count(336, 336, ipc),
        "max_image_tokens": ipc.max_pixels // (ipc.factor ** 2),
        "min_pixels": ipc.min_pixels,
        "max_pixels": ipc.max_pixels,
        "image_grid_pinpoints": None,
    }


class QwenVLModel(DecoderVLM):
    parts = {"visual": "vision", "language_model": "language_model", "lm_head": "language_model"}

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = QwenVisionTower(cfg.vision)
        self._init_decoder(cfg.text)

    @property
    def vision_device(self) -> torch.device:
        return self.visual.patch_embed.proj.weight.device

    def init_buffers(self) -> None:
        super().init_buffers()
        self.visual.rotary_pos_emb.init_rope(self.vision_device)

    def encode(self, pixels) -> list[torch.Tensor]:
        """(pixel_values (patches, C*Tp*P*P), grid_thw (n, 3)) -> one (t*h*w / merge^2, D) embedding per image."""
        pixel_values, grid = pixels
        weight = self.visual.patch_embed.proj.weight
        x = pixel_values.to(weight.device, weight.dtype)
        with matmuls(x, rows=x.shape[0]):
            out = self.visual(x, grid.to(weight.device))
        merge = self.cfg.vision.spatial_merge_size ** 2
        return list(out.split([int(t * h * w) // merge for t, h, w in grid.tolist()]))


class QwenVLProcessor:
    """Messages -> token ids with each image's `<|image_pad|>` run, and M-RoPE positions (3, T)."""

    def __init__(self, cfg: QwenVLConfig, prompt: PromptBuilder, image_config: QwenProcessorConfig):
        self.cfg, self.prompt, self.image_config = cfg, prompt, image_config

    def image_tokens(self, size: tuple[int, int]) -> int:
        return image_token_count(size[0], size[1], self.image_config)

    def _build(self, messages, limits):
        template_messages, sources = normalize_messages(messages, self.prompt.template)
        self.prompt.build(template_messages, n_images=len(sources), image_tokens=[1] * len(sources))
        loaded = [load_image(src, limits) for src in sources]
        counts = [self.image_tokens((im.height, im.width)) for im in loaded]
        inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts)
        return inputs, loaded, counts

    def prepare(self, messages, limits) -> Prepared:
        inputs, loaded, counts = self._build(messages, limits)
        grids = [image_grid(im.height, im.width, self.image_config) for im in loaded]
        positions, delta = rope_index(inputs.input_ids, grids or None, None,
                                      spatial_merge_size=self.cfg.vision.spatial_merge_size,
                                      image_token_id=self.cfg.image_token_id,
                                      video_token_id=self.cfg.video_token_id, kind=self.cfg.kind)
        return Prepared(inputs.input_ids, inputs.image_mask, [ImageChunk(im, n) for im, n in zip(loaded, counts)],
                        positions=positions, next_position=len(inputs.input_ids) + int(delta), text=inputs.text)

    def count_tokens(self, messages, limits) -> int:
        return len(self._build(messages, limits)[0].input_ids)

    def pixels(self, chunks: list[ImageChunk]):
        return process_images([c.image.image for c in chunks], self.image_config)
