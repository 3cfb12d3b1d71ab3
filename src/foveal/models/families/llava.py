"""The LLaVA family: LLaVA-1.5 (llava-hf and the original repo's layout) and LLaVA-NeXT (anyres).

A CLIP / SigLIP tower, a linear or 2-layer-MLP projector, and a Llama / Mistral / Qwen2 decoder
(`models.vlm.VisionLanguageModel`). An image takes a fixed number of tokens (the tower's patch
grid), or on LLaVA-NeXT a number that depends on its size (`processing.anyres`); positions are
the plain 0..T-1.

Design decisions:
- The config mapping (`config.config_from_hf`) and the checkpoint name rules
  (`weights.safetensors.NAME_RULES`) predate the family seam and stay where the GGUF and
  training code read them too; this module is where the API reaches them.
- The original LLaVA repo keeps its CLIP tower in another checkpoint named by
  `mm_vision_tower`: `complete` finds it, reads its config and adds its tensors.
- Pixels are made in one batch for the images that are not cached (anyres: one image at a
  time, each with its own tile count).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ... import config as C
from ...errors import ConfigError, ModelNotFoundError, PromptError
from ...processing.images import ImageProcessorConfig, load_image, preprocess_batch, preprocess_views
from ...processing.prompt import IMAGE_PLACEHOLDER, PromptBuilder, normalize_messages
from ...weights.safetensors import open_checkpoint
from ..interface import Checkpoint, ImageChunk, Prepared
from ..vlm import VisionLanguageModel

NAME = "llava"


def config(raw: dict) -> C.VLMConfig:
    return C.config_from_hf(raw)


def complete(cfg: C.VLMConfig, ck: Checkpoint, vision_tower=None) -> None:
    """The original layout: attach the separate CLIP tower's config, tensors and image processor."""
    if cfg.layout != "original":
        return
    tower = _find_tower(cfg, ck.path, vision_tower)
    C.attach_vision(cfg, C.load_config_file(tower / "config.json"))
    ck.sources.update({k: v for k, v in open_checkpoint(tower).items() if k.startswith("vision_tower.")})
    ck.image_processor = image_processor_of(tower)


def build(cfg: C.VLMConfig) -> VisionLanguageModel:
    return VisionLanguageModel(cfg)


def processor(cfg: C.VLMConfig, ck: Checkpoint, image_mode: str | None = None) -> "LlavaProcessor":
    tokenizer = ck.tokenizer
    image_token = tokenizer.config.get("image_token") or IMAGE_PLACEHOLDER
    image_token_id = cfg.image_token_id
    if cfg.layout == "llava-hf" and tokenizer.token_id(image_token) != image_token_id:
        found = tokenizer.tok.id_to_token(image_token_id) if image_token_id is not None else None
        if found is None:
            raise ConfigError(f"config image_token_index {image_token_id} is not in the tokenizer's vocabulary")
        image_token = found
    prompt = PromptBuilder(tokenizer, ck.template, image_token_id if cfg.layout == "llava-hf" else None,
                           cfg.image_tokens_per_image, image_token)
    return LlavaProcessor(cfg, prompt, _image_config(cfg, ck.image_processor, ck.raw_config, image_mode))


def hf_name(name: str, cfg: C.VLMConfig) -> str:
    """Module name -> checkpoint name (llava-hf's legacy layout, which every transformers reads)."""
    from ...weights.save import hf_name as legacy
    return legacy(name, cfg)


def config_to_hf(cfg: C.VLMConfig, raw: dict) -> dict:
    """config.json for a checkpoint foveal writes of this model (written in full)."""
    from ...weights.save import config_to_hf as full
    hf = full(cfg)
    if raw.get("image_aspect_ratio"):
        hf["image_aspect_ratio"] = raw["image_aspect_ratio"]
    return hf


def describe(cfg: C.VLMConfig, processor=None) -> dict:
    v = cfg.vision
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": cfg.layout,
        "language_model": cfg.text.model_type,
        "vision_tower": v.model_type if v else None,
        "vision_family": (("siglip" if v.is_siglip else "clip") if v else None),
        "projector": cfg.projector.kind if cfg.projector and v else None,
        "image_size": v.image_size if v else None,
        "patch_size": v.patch_size if v else None,
        "vision_layers": v.num_hidden_layers if v else None,
        "vision_hidden_size": v.hidden_size if v else None,
        "image_tokens_per_image": cfg.image_tokens_per_image,
        "max_image_tokens": cfg.max_image_tokens,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints] if cfg.anyres else None,
    }


# ---- memory planning (plan.py asks) ------------------------------------------------------------
def plan_complete(cfg: C.VLMConfig, folder: Path | None) -> list[str]:
    """The original layout's tower config, for a plan from config files alone (no weights needed)."""
    if cfg.layout != "original":
        return []
    tower = Path(cfg.vision_tower_path)
    found = [p for p in ([tower, folder / tower, folder / tower.name] if folder else [tower])
             if (p / "config.json").exists()]
    if found:
        C.attach_vision(cfg, C.load_config_file(found[0] / "config.json"))
        return []
    C.attach_vision(cfg, C.LLAVA_VISION_DEFAULT | {"image_size": 336 if "336" in tower.name else 224})
    return [f"vision tower {cfg.vision_tower_path!r} not found here: assumed CLIP ViT-L/14 at "
            f"{cfg.vision.image_size} px"]


def _max_views(cfg: C.VLMConfig) -> int:
    """Tower passes per image: 1, or an anyres model's base view + the most tiles a pinpoint has."""
    if not cfg.anyres:
        return 1
    return 1 + max((h // cfg.vision.image_size) * (w // cfg.vision.image_size) for h, w in cfg.image_grid_pinpoints)


def plan_vision(cfg: C.VLMConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor=None) -> tuple[int, int, list[str]]:
    """(the most tokens one image takes, bytes of activations to encode `images` images, notes)."""
    per_image = cfg.max_image_tokens
    v = cfg.vision
    if v is None or images == 0:
        return per_image, 0, []
    notes = []
    if cfg.anyres:      # images are encoded one at a time, each as a batch of its views
        notes.append(f"anyres (LLaVA-NeXT): an image takes {cfg.image_tokens_per_image} to {per_image} tokens by "
                     f"its size and aspect ({_max_views(cfg)} tower passes at most); planned at the most")
        images = _max_views(cfg)
    t = v.num_patches + (0 if v.is_siglip else 1)
    n_run = max(i if i >= 0 else v.num_hidden_layers + 1 + i for i in cfg.feature_layers)
    pixels = 3 * v.image_size ** 2 * 4 * 2                         # float32 preprocess output + its copy
    kept = (n_run + 1) * t * v.hidden_size * dbytes                # every hidden state is kept
    layer = t * (6 * v.hidden_size + 2 * v.intermediate_size) * dbytes   # norm, qkv, attn out, residual, MLP
    attn = v.num_attention_heads * t * t * 4                        # SDPA's score matrix (math path, fp32)
    features = t * cfg.text.hidden_size * dbytes * 2                # projector hidden + output
    return per_image, images * (pixels + kept + layer + attn + features), notes


class LlavaProcessor:
    """Messages -> token ids with a fixed (or, anyres, size-dependent) number of slots per image."""

    def __init__(self, cfg: C.VLMConfig, prompt: PromptBuilder, image_config: ImageProcessorConfig | None):
        self.cfg, self.prompt, self.image_config = cfg, prompt, image_config

    def image_tokens(self, size: tuple[int, int]) -> int:
        return self.cfg.image_tokens(size)

    @property
    def model_name(self) -> str:
        """For messages: what kind of model refuses a request."""
        return "a text-only model" if self.cfg.vision is None else "a LLaVA model"

    def prepare(self, messages, limits, budget=None) -> Prepared:
        template_messages, sources = normalize_messages(messages, self.prompt.template, model=self.model_name)
        inputs = self.prompt.build(template_messages, n_images=len(sources))   # prompt errors before decoding
        loaded = [load_image(src, limits) for src in sources]
        counts = [self.image_tokens((im.height, im.width)) for im in loaded]
        _check_budget(counts, loaded, budget)
        if self.cfg.anyres:
            inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts)
        return Prepared(inputs.input_ids, inputs.image_mask, [ImageChunk(im, n) for im, n in zip(loaded, counts)],
                        text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        template_messages, sources = normalize_messages(messages, self.prompt.template, model=self.model_name)
        counts = None
        if self.cfg.anyres or budget:      # the count depends on each image's size
            loaded = [load_image(src, limits) for src in sources]
            counts = [self.image_tokens((im.height, im.width)) for im in loaded]
            _check_budget(counts, loaded, budget)
        return len(self.prompt.build(template_messages, n_images=len(sources), image_tokens=counts).input_ids)

    def pixels(self, chunks: list[ImageChunk]):
        """(N, 3, S, S) for a fixed-size model; anyres: [(views (1 + tiles, 3, S, S), (height, width))]."""
        if self.cfg.anyres:
            return [(preprocess_views(c.image.image, self.image_config), c.size) for c in chunks]
        return preprocess_batch([c.image.image for c in chunks], self.image_config)


def _check_budget(counts: list[int], images, budget) -> None:
    """A LLaVA image's token count follows from the model (and, anyres, the image's size): a request's
    budget is kept or refused, never met by resizing."""
    if not budget:
        return
    lo, hi = budget
    for n, im in zip(counts, images):
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise PromptError(f"an image of {im.width}x{im.height} px takes {n} tokens on this model, outside the "
                              f"request's image-token budget ({lo or 1}-{hi or 'any'}); its images are not resized "
                              f"to a budget (only dynamic-resolution families, e.g. Qwen2-VL, are)")


# ---- checkpoint files ----------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def image_processor_of(folder: Path) -> dict | None:
    """The image processor's settings saved in an HF folder (None: none saved)."""
    if (folder / "preprocessor_config.json").exists():
        d = _read_json(folder / "preprocessor_config.json")
        return d.get("image_processor", d)
    if (folder / "processor_config.json").exists():      # newer transformers nest it here; else it only
        return _read_json(folder / "processor_config.json").get("image_processor")   # holds patch_size & co.
    return None


def _find_tower(cfg: C.VLMConfig, folder: Path, vision_tower) -> Path:
    candidates = [Path(vision_tower)] if vision_tower else []
    name = cfg.vision_tower_path
    candidates += [Path(name), folder / name, folder / Path(name).name]
    for c in candidates:
        if (c / "config.json").exists():
            return c
    try:    # an HF hub id already in the local cache
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:   # noqa: BLE001 - any failure means "not in the cache"
        pass
    raise ModelNotFoundError(f"the vision tower {name!r} named by mm_vision_tower was not found (looked in "
                             f"{', '.join(str(c) for c in candidates)} and the Hugging Face cache); pass "
                             f"vision_tower=PATH")


def _image_config(cfg: C.VLMConfig, image_processor: dict | None, raw: dict,
                  image_mode: str | None) -> ImageProcessorConfig | None:
    if cfg.vision is None:
        return None
    if image_processor is not None:
        ipc = ImageProcessorConfig.from_hf(image_processor)
    else:
        ipc = ImageProcessorConfig.for_vision("siglip" if cfg.vision.is_siglip else "clip", cfg.vision.image_size)
    if cfg.anyres:
        if image_mode is not None:
            raise ConfigError(f"image_mode {image_mode!r} does not apply to an anyres (LLaVA-NeXT) model: "
                              f"it tiles each image at its own aspect")
        if ipc.grid_pinpoints is not None and ipc.grid_pinpoints != cfg.image_grid_pinpoints:
            raise ConfigError(f"the image processor's image_grid_pinpoints {ipc.grid_pinpoints} differ from "
                              f"config.json's {cfg.image_grid_pinpoints}")
        return replace(ipc, mode="crop", grid_pinpoints=cfg.image_grid_pinpoints)
    if raw.get("image_aspect_ratio") == "pad":     # original LLaVA-1.5 trained on padded squares
        ipc.mode = "pad"
    if image_mode is not None:
        if image_mode not in ("crop", "pad", "resize"):
            raise ConfigError(f"image_mode {image_mode!r} is not supported; use crop, pad or resize")
        ipc.mode = image_mode
    _check_output_size(ipc, cfg)
    return ipc


def _check_output_size(ipc: ImageProcessorConfig, cfg: C.VLMConfig) -> None:
    """A tower's position embeddings fit one image size: say so before any pixel runs (transformers fails
    later, with a shape mismatch inside the tower)."""
    try:
        h, w = ipc.output_size()
    except ConfigError:
        return          # sized by the image (no crop, no fixed height/width): the tower checks each image
    s = cfg.vision.image_size
    if (h, w) != (s, s):
        raise ConfigError(f"the image processor config (preprocessor_config.json: size / crop_size) makes {w}x{h} "
                          f"px images, but the vision tower (config.json: vision_config.image_size) is built for "
                          f"{s}x{s} px; make the two agree (crop_size and size of {s})")
