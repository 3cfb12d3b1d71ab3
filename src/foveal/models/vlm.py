"""The VLM: vision tower -> projector -> features written into the LM's token embeddings.

Design decisions (after llama.cpp's mtmd):
- The language model only ever receives embeddings; image positions are given as a boolean
  mask, not as a vocabulary id, so the original LLaVA layout (no `<image>` token in the
  vocabulary) and llava-hf (`image_token_index`) take the same path.
- The number of image positions must equal the number of projected feature rows; a mismatch
  is refused (it means the prompt and the images disagree).
- Pixels are encoded only when a prompt is prefilled; decode steps never see them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..config import VLMConfig
from ..errors import PromptError
from ..processing import anyres
from .cpu import matmuls
from .projector import Projector
from .text import TextModel
from .vision import VisionTower

log = logging.getLogger(__name__)


def part_of(parts: dict[str, str], name: str) -> str:
    """The part of a parameter or module name: its longest dotted prefix in `parts`, else the LM."""
    pieces = name.split(".")
    for k in range(len(pieces), 0, -1):
        part = parts.get(".".join(pieces[:k]))
        if part is not None:
            return part
    return "language_model"


class DecoderVLM(nn.Module):
    """What every family's model shares: the decoder `language_model` (models.text.TextModel) and its
    `lm_head`, image embeddings written into the token embeddings, prefill, the decode step and its
    torch.compile'd form, and the KV cache calls the engine makes. A family's model subclasses it,
    adds its vision side and calls `_init_decoder` last (so the state dict keeps the checkpoint's order)."""

    # `parts`: top-level module name -> "vision" | "projector" | "language_model" (the quantizer, the planner
    # and parameter_counts read the top level); a dotted key names a submodule that belongs to another part
    # than its parent (Qwen2-VL's `visual.merger`, the projector inside the tower), which training reads.
    parts: dict[str, str] = {}
    trainable = False           # `foveal train` knows this model's training forward (train/trainer.py)

    def part_of(self, name: str) -> str:
        return part_of(self.parts, name)

    def _init_decoder(self, text) -> None:
        self.language_model = TextModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    @property
    def input_device(self) -> torch.device:
        """Where token ids and positions go in: the embedding's device (the CPU when split by --gpu-layers)."""
        return self.language_model.embed_tokens.weight.device

    def init_buffers(self) -> None:
        """Fill the non-persistent buffers (RoPE frequencies) once the model left the meta device."""
        self.language_model.init_rope(self.input_device)

    def tie_weights(self) -> None:
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features written at image_mask positions."""
        ids = input_ids if image_mask is None else input_ids.masked_fill(image_mask, 0)
        embeds = self.language_model.embed_tokens(ids)
        n_slots = 0 if image_mask is None else int(image_mask.sum())
        n_rows = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_rows:
            raise PromptError(f"the prompt has {n_slots} image-token positions but the images "
                              f"give {n_rows} feature rows")
        if n_slots:
            flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), flat)
        return embeds

    # ---- the KV cache (held by the decoder's layers, sized by the engine) ----
    @property
    def cache_len(self) -> int:
        return self.language_model.cache_len

    def setup_cache(self, max_len: int, dtype) -> None:
        self.language_model.setup_cache(1, max_len, dtype)

    def drop_cache(self) -> None:
        self.language_model.drop_cache()

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One decode step: token (1, 1) at RoPE position input_pos (1,), written at cache slot kv_len - 1
        and attending to kv_len cache slots -> logits (V,). Pure (no kernel switches, no Python state): `decode` runs it, or
        its torch.compile'd form (see `compile_decode`)."""
        h = self.language_model(self.language_model.embed_tokens(token), input_pos, kv_len)
        return self.lm_head(h)[0, -1]

    def decode(self, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        with matmuls(self.language_model.embed_tokens.weight, rows=1):
            if self._compiled_decode is not None:
                try:
                    return self._compiled_decode(token, input_pos, kv_len)
                except Exception as e:   # noqa: BLE001 - e.g. no C++ compiler for Inductor: run eagerly
                    self._compiled_decode = None
                    log.warning("torch.compile of the decode step failed (%s: %.300s); decoding eagerly from "
                                "now on", type(e).__name__, e)
            return self.decode_step(token, input_pos, kv_len)

    _compiled_decode = None

    def compile_decode(self) -> None:
        """Run decode steps through torch.compile (Inductor): the ~1,800 small eager ops of a step
        (norms, RoPE, residuals, attention over the cache) fuse into a few kernels; the matmuls stay
        PyTorch's own. The first step compiles (tens of seconds on 2 cores, cached on disk after;
        `load(compile=True)` runs one at load, `Engine.warm_up`).
        dynamic=True: the cache length a step attends to changes every step without recompiling."""
        # Module parameters and buffers are traced with static shapes by default: the KV cache, which
        # the engine reallocates larger when a request needs it, would recompile the step each time.
        dynamic_buffers = torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                                     force_nn_module_property_static_shapes=False)
        self._compiled_decode = dynamic_buffers(torch.compile(self.decode_step, dynamic=True))

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                start: int | None = None, layer_additions=None) -> torch.Tensor:
        """embeds (B, T, D) at RoPE positions input_pos (T,) or (3, T), in cache slots from start (default:
        input_pos[0]) -> logits (B, T, V), or (B, 1, V) for the last position. layer_additions: rows added
        after the first decoder layers (TextModel.forward), for a prefill."""
        B, T = embeds.shape[:2]
        with matmuls(embeds, rows=B * T):
            h = self.language_model(embeds, input_pos, start=start, layer_additions=layer_additions)
        if last_only:
            h = h[:, -1].unsqueeze(1)       # contiguous (B, 1, D): a strided view made F.linear copy the head
        with matmuls(h, rows=h.shape[0] * h.shape[1]):
            return self.lm_head(h)


class VisionLanguageModel(DecoderVLM):
    """The LLaVA family's model (and a text LM's, with no tower): the engine contract of
    models/interface.py plus the LLaVA-only steps that training and the parity tests call."""
    parts = {"vision_tower": "vision", "multi_modal_projector": "projector", "image_newline": "projector",
             "language_model": "language_model", "lm_head": "language_model"}
    trainable = True

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vision is not None:
            self.vision_tower = VisionTower(cfg.vision, cfg.feature_layers)
            self.multi_modal_projector = Projector(cfg.projector)
        if cfg.anyres:      # LLaVA-NeXT: a learnt vector after each row of tile features
            self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self._init_decoder(cfg.text)

    @property
    def has_vision(self) -> bool:
        return self.cfg.vision is not None

    @property
    def vision_device(self) -> torch.device:
        """Where pixels go in."""
        return self.vision_tower.embeddings.patch_embedding.weight.device if self.has_vision else self.input_device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> selected vision features (N, tokens_per_image, D_vision), before the
        projector (training with a frozen tower computes these without gradients)."""
        if not self.has_vision:
            raise PromptError("this model has no vision tower: it cannot take images")
        states = self.vision_tower(pixels)
        if self.cfg.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]                     # drop position 0 (CLS on CLIP)
        return torch.cat(states, dim=-1) if len(states) > 1 else states[0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> image embeddings (N, tokens_per_image, D_text)."""
        with matmuls(pixels, rows=pixels.shape[0] * max(self.cfg.image_tokens_per_image, 2)):
            return self.project(self.image_features(pixels))

    def encode(self, pixels) -> list[torch.Tensor]:
        """What `LlavaProcessor.pixels` made -> one (tokens, D_text) embedding per image."""
        if isinstance(pixels, list):        # anyres: one image at a time, each has its own tile count
            return [self.encode_anyres(views.to(self.vision_device), size) for views, size in pixels]
        return list(self.encode_images(pixels.to(self.vision_device)))

    def encode_anyres(self, views: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """An anyres model: one image's views (1 + tiles, 3, S, S) and its (height, width) -> its image
        embeddings (T, D_text), T = cfg.image_tokens(size)."""
        return self.pack_anyres(self.encode_images(views), size)

    def pack_anyres(self, embeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's projected view features (1 + tiles, P, D_text) -> its token rows (T, D_text): tiles
        stitched and unpadded, image_newline after each row (training packs a batch's images with it)."""
        return anyres.pack(embeds, self.cfg.image_layout(size), self.image_newline)
