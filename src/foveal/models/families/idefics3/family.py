"""The Idefics3 / SmolVLM family: `Idefics3ForConditionalGeneration` (idefics3) and
`SmolVLMForConditionalGeneration` (smolvlm), images.

A SigLIP ViT over square frames (vision.py), a pixel-shuffle connector folding scale x scale patches into
one LM token through one linear layer, and a Llama decoder (models.text). An image is resized to its
longest edge, rounded up to whole tiles, cut into a grid of tiles plus a global view of one tile
(image_processing.py); every frame gives `image_seq_len` tokens.

Design decisions:
- transformers 5.25's Idefics3 and SmolVLM classes differ only in name for images (config defaults,
  modeling, image processor and the image text of the processor are the same code), so one config, one
  model and one processor serve both; `kind` keeps which one a checkpoint is.
- The prompt: the chat template writes `<image>`; each becomes HF's text for its grid,
  `<fake_token_around_image><row_r_col_c><image>*L` per tile, a newline after each row, then
  `\\n<fake_token_around_image><global-img><image>*L<fake_token_around_image>` (or that last part alone
  for an image that is not split), and the whole prompt is tokenized at once, as HF does. The count
  follows from the image's size before any pixel is read.
- L (image_seq_len) = (tile / patch_size)^2 / scale_factor^2, the rows the connector makes of one frame;
  a processor_config.json that says otherwise is refused (transformers would fail at the merge).
- Absent config keys take Idefics3Config's / Idefics3VisionConfig's class defaults and LlamaConfig's for
  the decoder; a tied head is tied whether the flag sits at the top or in text_config.
- Checkpoint names: `model.vision_model.*` -> `vision_model.*`, `model.connector.*` -> `connector.*`,
  `model.text_model.*` -> `language_model.*`; `lm_head`.
- A request's image-token budget is kept or refused, never met by resizing (the count follows the model's
  tiling), as LLaVA-NeXT does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .... import config as C
from ....errors import ConfigError, PromptError, UnsupportedModelError
from ....processing.images import load_image
from ....processing.prompt import PromptBuilder, normalize_messages
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared
from ...vision import ACTIVATIONS
from ...vlm import DecoderVLM
from .image_processing import FAKE_TOKEN, GLOBAL_TOKEN, Idefics3ImageConfig, frame_count, grid, image_text, process_image
from .vision import Idefics3Connector, Idefics3VisionTower
from ..common import config_as_loaded, processor_settings

NAME = "idefics3"
ARCHITECTURES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
# transformers 5.25's Idefics3VisionConfig / SmolVLMVisionConfig class defaults (the same)
VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6)
CONFIG_DEFAULTS = dict(image_token_id=128257, scale_factor=2, tie_word_embeddings=False)
IMAGE_TOKEN = "<image>"
CHECKPOINT_PREFIXES = {"model.vision_model.": "vision_model.", "model.connector.": "connector.",
                      "model.text_model.": "language_model."}


@dataclass
class Idefics3Config:
    kind: str                    # idefics3 | smolvlm
    architecture: str
    text: C.TextConfig
    vision: C.VisionConfig       # SigLIP-shaped
    scale_factor: int
    image_token_id: int

    @property
    def tokens_per_frame(self) -> int:
        """Rows the connector makes of one image_size-square frame (HF's Idefics3Model.image_seq_len)."""
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.scale_factor ** 2


def config(raw: dict) -> Idefics3Config:
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(f"the Idefics3 family reads model_type idefics3 or smolvlm, not {kind!r}")
    text = raw.get("text_config")
    vision = raw.get("vision_config")
    for key, value in (("text_config", text), ("vision_config", vision)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object")
    text = {"model_type": "llama", "rms_norm_eps": 1e-5} if text is None else text    # HF's sub-config default
    if text.get("model_type", "llama") not in C.TEXT_DEFAULTS:
        raise UnsupportedModelError(f"text_config.model_type {text.get('model_type')!r} is not supported for "
                                    f"{kind}; supported: {', '.join(C.TEXT_DEFAULTS)}")
    cfg_text = C.text_config_from_hf(text)
    cfg_text.tie_word_embeddings = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    v = VISION_DEFAULTS | {k: x for k, x in (vision or {}).items() if k in VISION_DEFAULTS and x is not None}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size"):
        if not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] < 1:
            raise ConfigError(f"vision_config.{key} must be a positive integer, got {v[key]!r}")
    if v["hidden_size"] % v["num_attention_heads"]:
        raise ConfigError(f"vision_config.hidden_size {v['hidden_size']} is not divisible by num_attention_heads "
                          f"{v['num_attention_heads']}")
    if v["hidden_act"] not in ACTIVATIONS:
        raise ConfigError(f"vision_config.hidden_act {v['hidden_act']!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    vcfg = C.VisionConfig(model_type="siglip_vision_model", **v)
    get = lambda k: raw.get(k, CONFIG_DEFAULTS[k])  # noqa: E731
    scale = get("scale_factor")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ConfigError(f"scale_factor must be a positive integer, got {scale!r}")
    side = vcfg.image_size // vcfg.patch_size
    if side % scale:
        raise ConfigError(f"scale_factor {scale} does not divide the {side}x{side} patch grid "
                          f"(vision_config.image_size {vcfg.image_size} / patch_size {vcfg.patch_size}); the "
                          f"pixel shuffle folds scale_factor x scale_factor patches into one token")
    token = get("image_token_id")
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < cfg_text.vocab_size:
        raise ConfigError(f"image_token_id {token!r} is not a token id of the {cfg_text.vocab_size}-token vocabulary")
    return Idefics3Config(kind, (raw.get("architectures") or [ARCHITECTURES[kind]])[0], cfg_text, vcfg, scale, token)


def complete(cfg: Idefics3Config, ck: Checkpoint, vision_tower=None) -> None:
    """Checkpoint names -> module names (model.vision_model / model.connector / model.text_model)."""
    for name in list(ck.sources):
        for old, new in CHECKPOINT_PREFIXES.items():
            if name.startswith(old):
                ck.sources[new + name[len(old):]] = ck.sources.pop(name)
                break


def hf_name(name: str, cfg: Idefics3Config) -> str:
    """Module name -> checkpoint name, as transformers saves the model."""
    for old, new in CHECKPOINT_PREFIXES.items():
        if name.startswith(new):
            return old + name[len(new):]
    return name


def config_to_hf(cfg: Idefics3Config, raw: dict) -> dict:
    return config_as_loaded(raw, f"an {cfg.kind}")


def build(cfg: Idefics3Config) -> "Idefics3Model":
    return Idefics3Model(cfg)


def processor(cfg: Idefics3Config, ck: Checkpoint, image_mode: str | None = None) -> "Idefics3Processor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to an {cfg.kind} model: it tiles each image "
                          f"at its own aspect")
    tokenizer = ck.tokenizer
    if tokenizer.token_id(IMAGE_TOKEN) != cfg.image_token_id:
        raise ConfigError(f"config image_token_id {cfg.image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                          f"({tokenizer.token_id(IMAGE_TOKEN)})")
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja, chat_template.json or "
                          f"tokenizer_config.json's chat_template): an {cfg.kind} prompt cannot be built without it")
    image_config = Idefics3ImageConfig.from_hf(ck.image_processor)
    p = cfg.vision.patch_size * cfg.scale_factor
    if image_config.tile % p:
        raise ConfigError(f"the image processor's tile (max_image_size.longest_edge {image_config.tile}) is not a "
                          f"multiple of patch_size x scale_factor = {p} (config.json)")
    seq_len = (image_config.tile // cfg.vision.patch_size) ** 2 // cfg.scale_factor ** 2
    saved = processor_settings(ck).get("image_seq_len")
    if saved is not None and saved != seq_len:
        raise ConfigError(f"processor_config.json's image_seq_len {saved} differs from the {seq_len} tokens the "
                          f"model makes of a {image_config.tile}-px tile ((tile / patch_size)^2 / scale_factor^2)")
    # SmolVLMProcessor reads its marker tokens from the tokenizer's config where it names them
    names = tokenizer.config if cfg.kind == "smolvlm" else {}
    fake = names.get("fake_image_token") or FAKE_TOKEN
    global_token = names.get("global_image_token") or GLOBAL_TOKEN
    prompt = PromptBuilder(tokenizer, ck.template, cfg.image_token_id, seq_len, IMAGE_TOKEN)
    return Idefics3Processor(cfg, prompt, image_config, seq_len, fake, global_token)


def describe(cfg: Idefics3Config, processor: "Idefics3Processor | None" = None) -> dict:
    """image_tokens_per_image: one frame's tokens (an image takes that per tile, plus its global view)."""
    ipc = processor.image_config if processor is not None else Idefics3ImageConfig()
    seq_len = processor.seq_len if processor is not None else cfg.tokens_per_frame
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": cfg.kind,
        "language_model": cfg.text.model_type,
        "vision_tower": f"{cfg.kind}_vision",
        "vision_family": "siglip",
        "projector": "pixel_shuffle+linear",
        "image_size": None,
        "patch_size": cfg.vision.patch_size,
        "vision_layers": cfg.vision.num_hidden_layers,
        "vision_hidden_size": cfg.vision.hidden_size,
        "image_tokens_per_image": seq_len,
        "max_image_tokens": seq_len * _max_frames(ipc),
        "tile_size": ipc.tile,
        "scale_factor": cfg.scale_factor,
        "image_grid_pinpoints": None,
    }


def _max_frames(ipc: Idefics3ImageConfig) -> int:
    """The most frames one image makes: a square image at the resize target (every image is scaled to it)."""
    if not ipc.do_resize:
        return 1 + (4096 // ipc.tile) ** 2 if ipc.do_image_splitting else 1
    side = ipc.longest_edge or max(ipc.height, ipc.width)
    return frame_count(side, side, ipc)


# ---- memory planning (plan.py asks) ------------------------------------------------------------
def plan_complete(cfg: Idefics3Config, folder) -> list[str]:
    return []


def plan_vision(cfg: Idefics3Config, images: int, dbytes: int, image_processor: dict | None = None,
                processor: "Idefics3Processor | None" = None) -> tuple[int, int, list[str]]:
    """Planned at the most frames an image makes: (its tokens, the tower's activations for `images` such
    images encoded in one batch of frames, a note)."""
    ipc = processor.image_config if processor is not None else Idefics3ImageConfig.from_hf(image_processor)
    seq_len = (ipc.tile // cfg.vision.patch_size) ** 2 // cfg.scale_factor ** 2
    frames = _max_frames(ipc)
    per_image = seq_len * frames
    if images == 0:
        return per_image, 0, []
    v = cfg.vision
    t = (ipc.tile // v.patch_size) ** 2                              # patches of one frame
    pixels = 3 * ipc.tile ** 2 * 4 * 2                               # float32 frame + its copy
    layer = t * (6 * v.hidden_size + 2 * v.intermediate_size) * dbytes
    kept = 2 * t * v.hidden_size * dbytes
    attn = v.num_attention_heads * t * t * 4
    connector = seq_len * (v.hidden_size * cfg.scale_factor ** 2 + cfg.text.hidden_size) * dbytes
    note = (f"tiled ({cfg.kind}): an image takes {seq_len} tokens per {ipc.tile}-px tile plus {seq_len} for its "
            f"global view, up to {per_image} ({frames} frames); planned at the most")
    return per_image, images * frames * (pixels + layer + kept + attn + connector), [note]


class Idefics3Model(DecoderVLM):
    parts = {"vision_model": "vision", "connector": "projector", "language_model": "language_model",
             "lm_head": "language_model"}
    has_vision = True

    def __init__(self, cfg: Idefics3Config):
        super().__init__()
        self.cfg = cfg
        self.vision_model = Idefics3VisionTower(cfg.vision)
        self.connector = Idefics3Connector(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.scale_factor)
        self._init_decoder(cfg.text)

    @property
    def vision_device(self) -> torch.device:
        return self.vision_model.embeddings.patch_embedding.weight.device

    def encode(self, pixels) -> list[torch.Tensor]:
        """(frames (N, 3, S, S), pixel masks (N, S, S), frames per image) -> one (frames * L, D) per image."""
        frames, masks, counts = pixels
        weight = self.vision_model.embeddings.patch_embedding.weight
        x = frames.to(weight.device, weight.dtype)
        with matmuls(x, rows=x.shape[0] * max(1, (x.shape[-1] // self.cfg.vision.patch_size) ** 2)):
            features = self.connector(self.vision_model(x, masks.to(weight.device)))   # (N, L, D)
        return [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]


class Idefics3Processor:
    """Messages -> token ids with each image's tiles and global view written as HF's processor writes them."""

    def __init__(self, cfg: Idefics3Config, prompt: PromptBuilder, image_config: Idefics3ImageConfig,
                 seq_len: int, fake_token: str = FAKE_TOKEN, global_token: str = GLOBAL_TOKEN):
        self.cfg, self.prompt, self.image_config, self.seq_len = cfg, prompt, image_config, seq_len
        self.fake_token, self.global_token = fake_token, global_token

    def image_tokens(self, size: tuple[int, int]) -> int:
        return self.seq_len * frame_count(size[0], size[1], self.image_config)

    def _text(self, size: tuple[int, int]) -> str:
        rows, cols = grid(size[0], size[1], self.image_config)
        return image_text(rows, cols, self.seq_len, IMAGE_TOKEN, self.fake_token, self.global_token)

    def _build(self, messages, limits, budget=None):
        template_messages, sources = normalize_messages(messages, self.prompt.template,
                                                        model=f"an {self.cfg.kind} model")
        self.prompt.build(template_messages, n_images=len(sources))     # placeholder errors before decoding
        loaded = [load_image(src, limits) for src in sources]
        counts = [self.image_tokens((im.height, im.width)) for im in loaded]
        _check_budget(counts, loaded, budget)
        inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts,
                                   image_texts=[self._text((im.height, im.width)) for im in loaded])
        return inputs, [ImageChunk(im, n) for im, n in zip(loaded, counts)]

    def prepare(self, messages, limits, budget=None) -> Prepared:
        inputs, chunks = self._build(messages, limits, budget)
        return Prepared(inputs.input_ids, inputs.image_mask, chunks, text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        return len(self._build(messages, limits, budget)[0].input_ids)

    def pixels(self, chunks: list[ImageChunk]):
        """(frames (N, 3, S, S) float32, pixel masks (N, S, S), frames per image) for these images."""
        per_image = [process_image(c.image.image, self.image_config) for c in chunks]
        if not per_image:
            s = self.image_config.tile
            return torch.empty(0, 3, s, s), torch.empty(0, s, s, dtype=torch.bool), []
        frames = torch.cat(per_image)
        masks = torch.ones(frames.shape[0], *frames.shape[2:], dtype=torch.bool)
        return frames, masks, [p.shape[0] for p in per_image]


def _check_budget(counts: list[int], images, budget) -> None:
    if not budget:
        return
    lo, hi = budget
    for n, im in zip(counts, images):
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise PromptError(f"an image of {im.width}x{im.height} px takes {n} tokens on this model (its tiles "
                              f"and global view), outside the request's image-token budget ({lo or 1}-"
                              f"{hi or 'any'}); its images are not resized to a budget (only dynamic-resolution "
                              f"families, e.g. Qwen2-VL, are)")


__all__ = ["NAME", "config", "complete", "build", "processor", "describe", "hf_name", "config_to_hf",
           "plan_complete", "plan_vision", "Idefics3Config", "Idefics3Model", "Idefics3Processor"]
