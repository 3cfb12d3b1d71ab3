"""The Mllama family: Llama 3.2 Vision (`MllamaForConditionalGeneration`, model_type mllama).

An image is cut into up to `max_num_tiles` tiles on its best canvas (image_processing.py), encoded by a
local and a gated global ViT (vision.py) and projected to the decoder's width; the decoder is a Llama
whose layers at `cross_attention_layers` cross-attend to those states (decoder.py). In the prompt an
image is one `<|image|>` token: the image itself never enters the sequence.

Design decisions:
- The engine's contract is kept as it is. `encode` gives each image one row, its projected states
  (tiles * (patches + 1) * D) followed by its tile mask (max_num_tiles 0/1 values), so the engine's
  embedding LRU keeps them by the image's content hash and the prompt has one slot per image. `embed`
  embeds the token ids (`<|image|>` included, as HF does), builds the cross-attention mask from the image
  slots exactly as MllamaProcessor does (an image is attended from its token to the next image's,
  consecutive images as a group, text before the first image attends to none), and keeps it for the
  prefill that follows.
- Cross-attention keys and values are the model's own cache: computed in the prefill when the image set
  differs from the one they were computed from, then kept in the cross-attention layers across every
  decode step and later requests with the same images. The image set is identified by its content: the
  embeddings the engine hands `embed` (keyed by the images' content hashes in its LRU) compared exactly
  with those the K/V came from, so other images always recompute them.
- Text before the first image attends uniformly to every image tile in HF (its row of the mask is all
  zeros); so the same prefix is not the same KV once the image set changes. A prefill after a reused
  prefix with another image set than the cached one therefore runs from slot 0 again (the embeddings of
  the whole prompt are kept from `embed`); with the same images it runs only the new tokens.
- A decode step attends to what the last prompt token attends to (HF's generate repeats that row); its
  position / kv_len contract is the shared one. Without images the cross-attention layers are skipped.
- Checkpoint names: as transformers 5.25 saves them (`vision_model.*`, `multi_modal_projector.*`,
  `language_model.model.*`, `language_model.lm_head.*`), or its in-memory `model.*` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .... import config as C
from ....errors import ConfigError, PromptError
from ....processing.images import load_image
from ....processing.prompt import PromptBuilder, normalize_messages
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared
from ...vlm import DecoderVLM
from .decoder import MllamaTextModel
from .image_processing import MllamaImageConfig, process_image, supported_aspect_ratios, tile_layout
from .vision import MllamaVisionConfig, MllamaVisionModel
from ..common import config_as_loaded

NAME = "mllama"
ARCHITECTURE = "MllamaForConditionalGeneration"
IMAGE_TOKEN = "<|image|>"
# transformers 5.25's MllamaTextConfig / MllamaVisionConfig / MllamaConfig class defaults
TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, tie_word_embeddings=False, rope_theta=500000.0,
                     attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001)
CROSS_LAYERS_DEFAULT = [3, 8, 13, 18, 23, 28, 33, 38]
VISION_DEFAULTS = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, num_channels=3, intermediate_size=5120, vision_output_dim=7680,
                       image_size=448, patch_size=14, norm_eps=1e-5, max_num_tiles=4,
                       intermediate_layers_indices=[3, 7, 15, 23, 30],
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
IMAGE_TOKEN_DEFAULT = 128256


@dataclass
class MllamaConfig:
    architecture: str
    text: C.TextConfig
    vision: MllamaVisionConfig
    cross_attention_layers: list[int]
    image_token_id: int


def _int_list(value, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}")
    return list(value)


def config(raw: dict) -> MllamaConfig:
    if raw.get("model_type") != NAME:
        raise ConfigError(f"the Mllama family reads model_type mllama, not {raw.get('model_type')!r}")
    text, vision = raw.get("text_config") or {}, raw.get("vision_config") or {}
    for key, value in (("text_config", text), ("vision_config", vision)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object")
    plain = {k: v for k, v in text.items() if k not in ("head_dim", "model_type")}
    if not plain.get("rope_parameters") and not plain.get("rope_scaling"):
        plain["rope_parameters"] = {"rope_type": "default",
                                    "rope_theta": plain.get("rope_theta", TEXT_DEFAULTS["rope_theta"])}
    cfg_text = C.text_config_from_hf(plain | {"model_type": "llama"}, defaults=TEXT_DEFAULTS)
    cfg_text.head_dim = cfg_text.hidden_size // cfg_text.num_attention_heads   # HF: hidden / heads, always
    cfg_text.sliding_window = None
    cfg_text.tie_word_embeddings = bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)))
    cross = _int_list(text.get("cross_attention_layers", CROSS_LAYERS_DEFAULT), "text_config.cross_attention_layers")
    bad = [i for i in cross if not 0 < i < cfg_text.num_hidden_layers]
    if bad or len(set(cross)) != len(cross):
        raise ConfigError(f"text_config.cross_attention_layers {cross} must name distinct layers in 1.."
                          f"{cfg_text.num_hidden_layers - 1} (layer 0 is a self-attention layer in every Mllama)")
    v = {k: vision.get(k, d) for k, d in VISION_DEFAULTS.items()}
    if v["hidden_act"] != "gelu":
        raise ConfigError(f"vision_config.hidden_act {v['hidden_act']!r} is not supported (only gelu)")
    for key in ("image_size", "patch_size"):
        if isinstance(v[key], (list, tuple)):
            if len(set(v[key])) != 1:
                raise ConfigError(f"vision_config.{key} {v[key]} must be square")
            v[key] = v[key][0]
    inter = _int_list(v["intermediate_layers_indices"], "vision_config.intermediate_layers_indices")
    if any(not -v["num_hidden_layers"] <= i < v["num_hidden_layers"] for i in inter):
        raise ConfigError(f"vision_config.intermediate_layers_indices {inter} names a layer outside the "
                          f"{v['num_hidden_layers']}-layer local encoder")
    if v["vision_output_dim"] != v["hidden_size"] * (1 + len(inter)):
        raise ConfigError(f"vision_config.vision_output_dim {v['vision_output_dim']} is not hidden_size "
                          f"{v['hidden_size']} x (1 + {len(inter)} intermediate layers)")
    if v["image_size"] % v["patch_size"] or v["hidden_size"] % v["attention_heads"]:
        raise ConfigError(f"vision_config: image_size {v['image_size']} must be a multiple of patch_size "
                          f"{v['patch_size']} and hidden_size {v['hidden_size']} of attention_heads")
    vcfg = MllamaVisionConfig(**{k: v[k] for k in VISION_DEFAULTS if k != "hidden_act"} | {
        "intermediate_layers_indices": inter})
    token = raw.get("image_token_index", raw.get("image_token_id", IMAGE_TOKEN_DEFAULT))
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < cfg_text.vocab_size + 8:
        raise ConfigError(f"image_token_index {token!r} is not a token of the {cfg_text.vocab_size}+8-row embedding")
    return MllamaConfig((raw.get("architectures") or [ARCHITECTURE])[0], cfg_text, vcfg, cross, token)


def complete(cfg: MllamaConfig, ck: Checkpoint, vision_tower=None) -> None:
    """The vision model's names: transformers 5.25 saves `vision_model.*` (which the shared rules read as
    a separate CLIP tower's, `vision_tower.*`), its in-memory layout is `model.vision_model.*`."""
    if vision_tower is not None:
        raise ConfigError("an Mllama checkpoint holds its own vision model: vision_tower does not apply")
    for prefix in ("vision_tower.", "model.vision_model."):
        for name in [n for n in ck.sources if n.startswith(prefix)]:
            ck.sources["vision_model." + name[len(prefix):]] = ck.sources.pop(name)


def hf_name(name: str, cfg: MllamaConfig) -> str:
    """Module name -> checkpoint name, as transformers 5.25's save_pretrained writes an Mllama model."""
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


def config_to_hf(cfg: MllamaConfig, raw: dict) -> dict:
    return config_as_loaded(raw, "an Mllama")


def build(cfg: MllamaConfig) -> "MllamaModel":
    return MllamaModel(cfg)


def processor(cfg: MllamaConfig, ck: Checkpoint, image_mode: str | None = None) -> "MllamaProcessor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to an Mllama model: it tiles every image "
                          f"onto its best canvas of up to max_num_tiles tiles")
    found = ck.tokenizer.token_id(IMAGE_TOKEN)
    if found != cfg.image_token_id:
        raise ConfigError(f"config image_token_index {cfg.image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                          f"({found})")
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template; in a GGUF, tokenizer.chat_template): an Mllama prompt cannot be built "
                          f"without it")
    image_config = image_config_for(cfg, ck.image_processor)
    return MllamaProcessor(cfg, PromptBuilder(ck.tokenizer, ck.template, cfg.image_token_id, 1, IMAGE_TOKEN),
                           image_config)


def image_config_for(cfg: MllamaConfig, raw: dict | None) -> MllamaImageConfig:
    ipc = MllamaImageConfig.from_hf(raw or {})
    v = cfg.vision
    if ipc.tile_size != v.image_size:
        raise ConfigError(f"the image processor cuts {ipc.tile_size}-px tiles but the vision model (config.json "
                          f"vision_config.image_size) takes {v.image_size}-px ones")
    if ipc.max_image_tiles != v.max_num_tiles:
        raise ConfigError(f"the image processor's max_image_tiles {ipc.max_image_tiles} differs from "
                          f"vision_config.max_num_tiles {v.max_num_tiles}")
    if len(supported_aspect_ratios(ipc.max_image_tiles)) > v.max_aspect_ratio_id:
        raise ConfigError(f"{ipc.max_image_tiles} tiles make {len(supported_aspect_ratios(ipc.max_image_tiles))} "
                          f"aspect ratios, but vision_config.supported_aspect_ratios lists only {v.max_aspect_ratio_id}")
    return ipc


def describe(cfg: MllamaConfig, processor: "MllamaProcessor | None" = None) -> dict:
    """An image is one token; what the decoder cross-attends to is tiles * (patches + 1) states."""
    v = cfg.vision
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": NAME,
        "language_model": "llama",
        "vision_tower": "mllama_vision",
        "vision_family": NAME,
        "projector": "linear+cross_attention",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "vision_layers": v.num_hidden_layers + v.num_global_layers,
        "vision_hidden_size": v.hidden_size,
        "image_tokens_per_image": 1,
        "max_image_tokens": 1,
        "max_num_tiles": v.max_num_tiles,
        "cross_attention_layers": list(cfg.cross_attention_layers),
        "image_states_per_image": v.max_num_tiles * v.num_patches,
        "image_grid_pinpoints": None,
    }


def plan_complete(cfg: MllamaConfig, folder: Path | None) -> list[str]:
    return []


def plan_vision(cfg: MllamaConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor: "MllamaProcessor | None" = None) -> tuple[int, int, list[str]]:
    """(1 token per image, the encoders' activations for `images` images of max_num_tiles tiles plus the
    cross-attention K/V the decoder keeps for them, a note)."""
    if images == 0:
        return 1, 0, []
    v, t = cfg.vision, cfg.text
    L = v.num_patches + (8 - v.num_patches % 8) % 8
    n = v.max_num_tiles * L                                          # tokens of one image in the encoders
    pixels = v.max_num_tiles * 3 * v.image_size ** 2 * 4 * 2
    layer = n * (6 * v.hidden_size + 2 * v.intermediate_size) * dbytes
    kept = n * v.hidden_size * (2 + len(v.intermediate_layers_indices)) * dbytes   # stream + intermediates
    attn = v.attention_heads * n * n * 4
    states = v.max_num_tiles * v.num_patches * (v.vision_output_dim + t.hidden_size) * dbytes
    cross_kv = (len(cfg.cross_attention_layers) * 2 * t.num_key_value_heads * t.head_dim
                * v.max_num_tiles * v.num_patches * dbytes)
    note = (f"an image is 1 prompt token; the decoder cross-attends to its {v.max_num_tiles} x {v.num_patches} "
            f"tile states (K/V kept per image set: {cross_kv / 2 ** 20:.1f} MiB per image)")
    return 1, images * (pixels + layer + kept + states + cross_kv) + attn, [note]


class MllamaModel(DecoderVLM):
    parts = {"vision_model": "vision", "multi_modal_projector": "projector", "language_model": "language_model",
             "lm_head": "language_model"}
    has_vision = True

    def __init__(self, cfg: MllamaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = MllamaVisionModel(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size, bias=True)
        self.language_model = MllamaTextModel(cfg.text, cfg.cross_attention_layers)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self._pending = None          # what `embed` saw, for the prefill that follows
        self._images = None           # the image embeddings the cross-attention K/V were computed from

    @property
    def vision_device(self) -> torch.device:
        return self.vision_model.patch_embedding.weight.device

    @property
    def _row_width(self) -> int:
        v = self.cfg.vision
        return v.max_num_tiles * v.num_patches * self.cfg.text.hidden_size

    def encode(self, pixels) -> list[torch.Tensor]:
        """(pixel_values (n, tiles, 3, S, S), aspect_ratio_ids (n,), aspect_ratio_mask (n, tiles)) -> one
        (1, tiles * (patches + 1) * D + tiles) row per image: its projected states, then its tile mask."""
        pixel_values, ratio_ids, ratio_mask = pixels
        n = pixel_values.shape[0]
        with matmuls(pixel_values, rows=n * self.cfg.vision.max_num_tiles * self.cfg.vision.num_patches):
            out = self.vision_model(pixel_values.to(self.vision_device), ratio_ids, ratio_mask)
            w = self.multi_modal_projector.weight
            states = self.multi_modal_projector(out.to(w.device, w.dtype))       # (n, tiles, L, D)
        tiles = ratio_mask.to(states.device, states.dtype)
        return list(torch.cat([states.reshape(n, -1), tiles], dim=-1)[:, None])

    def _unpack(self, image_embeds: torch.Tensor):
        """(1, n, row) -> states (n * tiles * L, D), tile counts [n]."""
        rows = image_embeds.reshape(-1, image_embeds.shape[-1])
        if rows.shape[-1] != self._row_width + self.cfg.vision.max_num_tiles:
            raise PromptError(f"Mllama image embeddings must be {self._row_width + self.cfg.vision.max_num_tiles} "
                              f"wide (tile states and tile mask), got {rows.shape[-1]}")
        states = rows[:, :self._row_width].reshape(-1, self.cfg.text.hidden_size)
        counts = (rows[:, self._row_width:] > 0.5).sum(-1).tolist()
        return states, counts

    def cross_attention_mask(self, image_slots: list[int], counts: list[int], T: int, dtype, device):
        """HF's _prepare_cross_attention_mask over the processor's dense mask: additive (T, n * tiles * L)
        (0 where allowed, the dtype's min elsewhere, all 0 on a row that attends to no image) and the row
        mask (T, 1)."""
        dense = dense_cross_attention_mask(image_slots, counts, T, self.cfg.vision.max_num_tiles)
        allowed = dense.repeat_interleave(self.cfg.vision.num_patches, dim=2).view(T, -1).to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        row_kept = allowed.any(-1, keepdim=True).to(dtype)
        return mask * row_kept, row_kept

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (the `<|image|>` token's own row at image slots); keeps the prompt's images and
        cross-attention mask for the prefill that follows."""
        embeds = self.language_model.embed_tokens(input_ids)
        n_slots = 0 if image_mask is None else int(image_mask.sum())
        n_images = 0 if image_embeds is None else image_embeds.reshape(-1, image_embeds.shape[-1]).shape[0]
        if n_slots != n_images:
            raise PromptError(f"the prompt has {n_slots} {IMAGE_TOKEN} position(s) but {n_images} image(s) were given")
        if n_images and input_ids.shape[0] != 1:
            raise PromptError("an Mllama prompt with images takes one sequence, not a batch")
        pending = {"embeds": embeds, "images": None}
        if n_images:
            states, counts = self._unpack(image_embeds)
            slots = image_mask[0].nonzero().flatten().tolist()
            dtype = self.language_model.norm.weight.dtype
            mask, row_kept = self.cross_attention_mask(slots, counts, input_ids.shape[1], dtype, embeds.device)
            pending.update(images=image_embeds, states=states, mask=mask, row_kept=row_kept)
        self._pending = pending
        return embeds

    def _same_images(self, images) -> bool:
        old = self._images
        if old is None or images is None:
            return old is None and images is None
        return old.shape == images.shape and old.device == images.device and bool(torch.equal(old, images))

    def set_images(self, images, states) -> None:
        """Compute (or drop, None) every cross-attention layer's K/V for this image set."""
        for layer in self.language_model.cross():
            layer.set_images(states)
        self._images = images

    def drop_cache(self) -> None:
        """The KV cache and the image set's cross-attention K/V (`unload`, `Engine.reset`)."""
        super().drop_cache()
        self.set_images(None, None)

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                start: int | None = None, layer_additions=None) -> torch.Tensor:
        """The prefill after `embed` (tokens [start, start + T) of its prompt); K/V of a new image set are
        computed here, and the decode steps' mask row set."""
        pending, self._pending = self._pending, None
        if pending is None:
            return super().forward(embeds, input_pos, last_only, start, layer_additions)
        start = 0 if start is None else start
        T_new = embeds.shape[1]
        if not self._same_images(pending["images"]):
            with matmuls(embeds, rows=self.cfg.vision.max_num_tiles * self.cfg.vision.num_patches):
                self.set_images(pending["images"], pending.get("states"))
            if start:       # the cached prefix was computed against other images: prefill it again
                embeds, start = pending["embeds"], 0
                input_pos = torch.arange(embeds.shape[1], device=input_pos.device)
        if pending["images"] is not None:
            rows = slice(start, start + embeds.shape[1])
            for layer in self.language_model.cross():
                layer.set_mask(pending["mask"][None, None, rows], pending["row_kept"][None, rows])
        logits = super().forward(embeds, input_pos, last_only, start, layer_additions)
        if pending["images"] is not None:       # every decode step attends as the last prompt token does
            for layer in self.language_model.cross():
                layer.set_mask(pending["mask"][None, None, -1:], pending["row_kept"][None, -1:])
        return logits if last_only else logits[:, -T_new:]


class MllamaProcessor:
    """Messages -> token ids with one `<|image|>` slot per image; pixels as MllamaImageProcessorPil makes them."""

    def __init__(self, cfg: MllamaConfig, prompt: PromptBuilder, image_config: MllamaImageConfig):
        self.cfg, self.prompt, self.image_config = cfg, prompt, image_config

    def image_tokens(self, size: tuple[int, int]) -> int:
        return 1

    def tiles(self, size: tuple[int, int]) -> tuple[int, int]:
        """(tiles down, tiles across) of a (height, width) image."""
        return tile_layout(size[0], size[1], self.image_config)

    def prepare(self, messages, limits, budget=None) -> Prepared:
        template_messages, sources = normalize_messages(messages, self.prompt.template, model="an Mllama model")
        inputs = self.prompt.build(template_messages, n_images=len(sources))    # prompt errors before decoding
        loaded = [load_image(src, limits) for src in sources]
        _check_budget(budget, len(loaded))
        return Prepared(inputs.input_ids, inputs.image_mask, [ImageChunk(im, 1) for im in loaded], text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        template_messages, sources = normalize_messages(messages, self.prompt.template, model="an Mllama model")
        _check_budget(budget, len(sources))
        return len(self.prompt.build(template_messages, n_images=len(sources)).input_ids)

    def pixels(self, chunks: list[ImageChunk]):
        """(pixel_values (n, max_num_tiles, 3, S, S), aspect_ratio_ids (n,), aspect_ratio_mask (n, max_num_tiles))."""
        done = [process_image(c.image.image, self.image_config) for c in chunks]
        return (torch.stack([d.pixel_values for d in done]), torch.tensor([d.aspect_ratio_id for d in done]),
                torch.stack([d.aspect_ratio_mask for d in done]))


def dense_cross_attention_mask(image_slots: list[int], counts: list[int], T: int, max_tiles: int) -> torch.Tensor:
    """MllamaProcessor's cross_attention_mask (T, n, max_tiles) bool from the image tokens' positions and
    tile counts (get_cross_attention_token_mask + convert_sparse_cross_attention_mask_to_dense): an image is
    attended from its token to the next image's, consecutive images as a group to the end of theirs."""
    spans = [[a, b] for a, b in zip(image_slots[:-1], image_slots[1:])] + [[image_slots[-1], T]]
    end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    dense = torch.zeros((T, len(image_slots), max_tiles), dtype=torch.bool)
    for i, ((a, b), k) in enumerate(zip(spans, counts)):
        dense[a:min(b, T), i, :k] = True
    return dense


def _check_budget(budget, n_images: int) -> None:
    """An Mllama image is one token whatever its size: a budget that excludes 1 is refused."""
    if not budget or not n_images:
        return
    lo, hi = budget
    if (lo is not None and lo > 1) or (hi is not None and hi < 1):
        raise PromptError(f"an image takes 1 token on an Mllama model (it is cross-attended, not in the sequence), "
                          f"outside the request's image-token budget ({lo or 1}-{hi or 'any'})")
