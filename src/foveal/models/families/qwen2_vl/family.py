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
- A video is `<|vision_start|><|video_pad|>...<|vision_end|>`, its count known from the container's
  header (frame count, rate, size) and the frames sampled from it (HF's `sample_frames`: 2 fps by
  default for a file, every frame of a list of frames); its frames are decoded only when the engine
  lacks its embedding, and go through the same tower as images (grid t > 1). Its settings are the
  video processor's, found where transformers looks: processor_config.json's `video_processor`,
  video_preprocessor_config.json, else preprocessor_config.json. Qwen2.5-VL spaces its time
  positions by `second_per_grid` (temporal_patch_size / the sampled frame rate).
- The first generated token's position is max(prompt positions) + 1 (HF's rope delta folded in);
  a decode step's position is one scalar for the three rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .... import config as C
from ....errors import ConfigError, ImageError, PromptError
from ....processing.images import load_image
from ....processing.prompt import PromptBuilder, VideoPart, normalize_messages
from ....processing.video import load_video
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared, VideoChunk
from ...vlm import DecoderVLM
from .config import QwenVisionConfig, mrope_section
from .positions import rope_index
from .image_processing import (IMAGE_DEFAULTS, QwenProcessorConfig, image_grid, image_token_count, process_image,
                               process_video, resized_size, sample_frame_indices)
from .vision import QwenVisionTower
from ..common import config_as_loaded

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
VIDEO_TOKEN = "<|video_pad|>"
VIDEO_SAMPLING = dict(fps=2.0, min_frames=4, max_frames=768)   # Qwen2VLVideoProcessor's class defaults
# Qwen3-VL writes a timestamp before each frame and has its own video processor: not read as video here
VIDEO_KINDS = ("qwen2_vl", "qwen2_5_vl")


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


def hf_name(name: str, cfg: QwenVLConfig) -> str:
    """Module name -> checkpoint name, as transformers 5 saves the model."""
    if name.startswith(("visual.", "language_model.")):
        return "model." + name
    return name


def config_to_hf(cfg: QwenVLConfig, raw: dict) -> dict:
    """config.json for a checkpoint foveal writes of this model: the one it was read from (the model is
    not reshaped by quantizing)."""
    return config_as_loaded(raw, "a Qwen2-VL")


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
    video = tokenizer.token_id(VIDEO_TOKEN) == cfg.video_token_id and cfg.kind in VIDEO_KINDS
    prompt = PromptBuilder(tokenizer, ck.template, cfg.image_token_id, 1, IMAGE_TOKEN,
                           VIDEO_TOKEN if video else None, cfg.video_token_id if video else None)
    video_raw = _video_processor_of(ck)
    video_config = QwenProcessorConfig.from_hf(video_raw, video=True)
    sampling = {k: video_raw.get(k) if video_raw.get(k) is not None else v for k, v in VIDEO_SAMPLING.items()}
    return QwenVLProcessor(cfg, prompt, image_config, video_config if video else None, sampling)


def _video_processor_of(ck: Checkpoint) -> dict:
    """The video processor's settings where transformers' video processor looks for them, in its order."""
    import json
    folder = ck.path if ck.path.is_dir() else None
    for name, key in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None)):
        if folder is not None and (folder / name).exists():
            try:
                d = json.loads((folder / name).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{folder / name} is not valid JSON: {e}") from None
            d = d.get(key) if key else d
            if isinstance(d, dict):
                return d
    return dict(ck.image_processor or {})


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


# ---- memory planning (plan.py asks) ------------------------------------------------------------
def plan_complete(cfg: QwenVLConfig, folder) -> list[str]:
    return []


EXAMPLE_SIZES = ((480, 640), (960, 1280), (1080, 1920))    # (height, width)


def plan_vision(cfg: QwenVLConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor: "QwenVLProcessor | None" = None) -> tuple[int, int, list[str]]:
    """Planned at the pixel budget's largest image: (its tokens, the tower's activations for `images`
    such images encoded in one batch, a note with the count at common sizes)."""
    ipc = processor.image_config if processor is not None else QwenProcessorConfig.from_hf(image_processor or {})
    per_image = ipc.max_pixels // ipc.factor ** 2
    if images == 0:
        return per_image, 0, []
    v = cfg.vision
    n = per_image * v.merge_unit                                   # patches of one image
    pixels = n * v.patch_dim * 4 * 2                               # float32 pixel rows + the cast copy
    layer = n * (6 * v.width + 2 * v.intermediate_size) * dbytes   # norm, qkv, attn out, residual, MLP
    kept = 2 * n * v.width * dbytes                                # the residual stream and one block's input
    merger = per_image * (v.merge_unit * v.width + v.out_width) * dbytes * 2
    attn = v.num_heads * n * n * 4                                  # one image's score matrix at a time (fp32)
    examples = ", ".join(f"{w}x{h}: {image_token_count(h, w, ipc)}" for h, w in EXAMPLE_SIZES)
    note = (f"dynamic resolution: an image takes {ipc.min_pixels // ipc.factor ** 2}-{per_image} tokens by its "
            f"size ({examples}); planned at the most")
    return per_image, images * (pixels + layer + kept + merger) + attn, [note]


class QwenVLModel(DecoderVLM):
    # visual.merger (ln_q + the 2-layer MLP from 4 merged patches to the LM width) plays LLaVA's projector
    # in training: `align` trains it alone, `instruct` with the LM, the ViT only under --train-vision. The
    # planner and parameter counts read the top level, where it stays inside the tower.
    parts = {"visual": "vision", "visual.merger": "projector", "language_model": "language_model",
             "lm_head": "language_model"}
    tower = QwenVisionTower
    trainable = True
    has_vision = True

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = self.tower(cfg.vision)
        self._init_decoder(cfg.text)

    @property
    def vision_device(self) -> torch.device:
        return self.visual.patch_embed.proj.weight.device

    def init_buffers(self) -> None:
        super().init_buffers()
        self.visual.rotary_pos_emb.init_rope(self.vision_device)

    def _run_tower(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The tower's rows for all images of the batch, in order: (patches / merge^2, width)."""
        return self.visual(x, grid)

    def encode(self, pixels) -> list[torch.Tensor]:
        """(pixel_values (patches, C*Tp*P*P), grid_thw (n, 3)) -> one (t*h*w / merge^2, D) embedding per image."""
        pixel_values, grid = pixels
        weight = self.visual.patch_embed.proj.weight
        x = pixel_values.to(weight.device, weight.dtype)
        with matmuls(x, rows=x.shape[0]):
            out = self._run_tower(x, grid.to(weight.device))
        merge = self.cfg.vision.spatial_merge_size ** 2
        return list(out.split([int(t * h * w) // merge for t, h, w in grid.tolist()]))


@dataclass(frozen=True)
class VideoOptions:
    """How one video of a request is made into pixels (VideoChunk.options)."""
    config: QwenProcessorConfig
    second_per_grid: float                  # Qwen2.5-VL time spacing
    limits: object                          # processing.images.VideoLimits, checked again while decoding


class QwenVLProcessor:
    """Messages -> token ids with each image's `<|image_pad|>` run and each video's `<|video_pad|>` run, and
    M-RoPE positions (3, T)."""

    def __init__(self, cfg: QwenVLConfig, prompt: PromptBuilder, image_config: QwenProcessorConfig,
                 video_config: QwenProcessorConfig | None = None, video_sampling: dict | None = None):
        self.cfg, self.prompt, self.image_config = cfg, prompt, image_config
        self.video_config, self.video_sampling = video_config, dict(video_sampling or VIDEO_SAMPLING)

    def image_tokens(self, size: tuple[int, int]) -> int:
        return image_token_count(size[0], size[1], self.image_config)

    def budgeted(self, budget) -> tuple[QwenProcessorConfig, str]:
        """The image settings for a request's (min, max) image tokens, and the cache-key suffix they imply."""
        if not budget:
            return self.image_config, ""
        lo, hi = budget
        per_token = self.image_config.factor ** 2
        lo_px = self.image_config.min_pixels if lo is None else lo * per_token
        hi_px = self.image_config.max_pixels if hi is None else hi * per_token
        if lo_px > hi_px:
            raise PromptError(f"the image-token budget ({lo or 'the model default'}-{hi or 'the model default'}) "
                              f"is empty: this model's images take {self.image_config.min_pixels // per_token}-"
                              f"{self.image_config.max_pixels // per_token} tokens unless both ends are given")
        return self.image_config.budget(lo_px, hi_px), f":{lo_px}-{hi_px}"

    def _video(self, part: VideoPart, limits) -> VideoChunk:
        """Probe a video and sample its frames (Qwen2VLVideoProcessor.sample_frames): a file at `fps` (2 by
        default), a list of frames whole; num_frames instead of either."""
        vcfg, tp = self.video_config, self.video_config.temporal_patch_size
        is_list = isinstance(part.video, (list, tuple))
        video = load_video(part.video, limits, fps=part.fps if is_list else None)
        cap = min(part.max_frames or self.video_sampling["max_frames"], limits.video.max_frames)
        fps = None if is_list or part.num_frames else (part.fps or self.video_sampling["fps"])
        if part.num_frames or fps:
            indices = sample_frame_indices(video.n_frames, tp, video.fps, fps=fps, num_frames=part.num_frames,
                                           min_frames=self.video_sampling["min_frames"], max_frames=cap)
        else:
            indices = list(range(video.n_frames))
        if len(indices) > limits.video.max_frames or (part.max_frames and len(indices) > part.max_frames):
            most = min(limits.video.max_frames, part.max_frames or limits.video.max_frames)
            raise ImageError(f"{video.origin}: {len(indices)} frames sampled, over the limit of {most}; "
                             f"ask for fewer (num_frames, fps) or send a shorter video")
        height, width = resized_size(video.height, video.width, vcfg)
        n_tokens = -(-len(indices) // tp) * (height // vcfg.patch_size) * (width // vcfg.patch_size) \
            // vcfg.merge_size ** 2
        # Qwen2_5_VLProcessor: temporal_patch_size / the sampled frame rate (24 fps assumed when none is known)
        sampled_fps = len(indices) / video.n_frames * video.fps if video.fps else 24
        return VideoChunk(video, n_tokens, indices, VideoOptions(vcfg, tp / sampled_fps, limits.video))

    def _without_video(self) -> str:
        if self.cfg.kind not in VIDEO_KINDS:
            return f"a {self.cfg.kind} model (foveal reads video for Qwen2-VL and Qwen2.5-VL only)"
        return f"this Qwen2-VL checkpoint (its tokenizer has no {VIDEO_TOKEN} token {self.cfg.video_token_id})"

    def _build(self, messages, limits, budget=None):
        ipc, variant = self.budgeted(budget)
        template_messages, sources = normalize_messages(messages, self.prompt.template,
                                                        takes_video=self.video_config is not None,
                                                        model=self._without_video())
        images = [s for s in sources if not isinstance(s, VideoPart)]
        videos = [s for s in sources if isinstance(s, VideoPart)]
        self.prompt.build(template_messages, n_images=len(images), image_tokens=[1] * len(images),
                          video_tokens=[1] * len(videos))      # placeholder errors before anything is read
        loaded = [load_image(src, limits) for src in images]
        counts = [image_token_count(im.height, im.width, ipc) for im in loaded]
        clips = [self._video(v, limits) for v in videos]
        inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts,
                                   video_tokens=[c.n_tokens for c in clips])
        image_chunks = iter([ImageChunk(im, n, ipc, variant) for im, n in zip(loaded, counts)])
        clips_left = iter(clips)
        chunks = [next(image_chunks) if kind == "image" else next(clips_left) for kind in inputs.media]
        return inputs, chunks, ipc

    def prepare(self, messages, limits, budget=None) -> Prepared:
        inputs, chunks, ipc = self._build(messages, limits, budget)
        grids = [image_grid(c.image.height, c.image.width, ipc) for c in chunks if c.kind == "image"]
        clips = [c for c in chunks if c.kind == "video"]
        video_grids = [self._video_grid(c) for c in clips]
        positions, delta = rope_index(inputs.input_ids, grids or None, video_grids or None,
                                      spatial_merge_size=self.cfg.vision.spatial_merge_size,
                                      image_token_id=self.cfg.image_token_id,
                                      video_token_id=self.cfg.video_token_id, kind=self.cfg.kind,
                                      second_per_grid_ts=[c.options.second_per_grid for c in clips] or None,
                                      tokens_per_second=self.cfg.vision.tokens_per_second)
        return Prepared(inputs.input_ids, inputs.image_mask, chunks, positions=positions,
                        next_position=len(inputs.input_ids) + int(delta), text=inputs.text)

    @staticmethod
    def _video_grid(chunk: VideoChunk) -> tuple[int, int, int]:
        vcfg = chunk.options.config
        height, width = resized_size(chunk.video.height, chunk.video.width, vcfg)
        return -(-chunk.frames // vcfg.temporal_patch_size), height // vcfg.patch_size, width // vcfg.patch_size

    def count_tokens(self, messages, limits, budget=None) -> int:
        return len(self._build(messages, limits, budget)[0].input_ids)

    def positions(self, input_ids: list[int], image_mask: list[bool], sizes: list[tuple[int, int]]) -> torch.Tensor:
        """M-RoPE positions (3, T) of built ids whose images have these (height, width) sizes (training)."""
        grids = [image_grid(h, w, self.image_config) for h, w in sizes]
        ids = [self.cfg.image_token_id if m else t for t, m in zip(input_ids, image_mask)]
        return rope_index(ids, grids or None, None, spatial_merge_size=self.cfg.vision.spatial_merge_size,
                          image_token_id=self.cfg.image_token_id, video_token_id=self.cfg.video_token_id,
                          kind=self.cfg.kind)[0]

    def pixels(self, chunks: list):
        parts = []
        for c in chunks:
            if c.kind == "video":
                done = process_video(c.video.decode(c.indices, c.options.limits), c.options.config)
                parts.append((done.pixel_values, done.grid_thw))
            else:
                parts.append(process_image(c.image.image, c.options or self.image_config))
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
