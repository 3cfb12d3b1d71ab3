"""Qwen2-VL / Qwen2.5-VL pixel preprocessing: images and video frames -> flat patches + grid_thw.

Mirrors transformers 5.25 models/qwen2_vl: `smart_resize`, `Qwen2VLImageProcessorPil` (images) and
`Qwen2VLVideoProcessor` (videos), plus `Qwen2_5_VLProcessor._process_videos` (second_per_grid_ts).

Design decisions
- Images follow the PIL backend, which is what `AutoImageProcessor` / `AutoProcessor` give without
  torchvision (and what foveal's other processors match): PIL bicubic resize on uint8, rescale in
  float64 cast to float32, normalize in float32. With torchvision installed HF picks its torchvision
  backend, which resizes differently (antialiased tensor bicubic) and is not matched for images.
- Video has only a torchvision implementation in HF; its resize is reproduced here in plain torch:
  on CPU torchvision hands the uint8 frames to torch's native uint8 antialiased bicubic kernel
  (`F.interpolate` on uint8). On CUDA it would cast to float32, interpolate, clamp and round, which
  differs by up to ~20 levels: HF's own video output depends on the device it preprocesses on; this
  module always computes the CPU result. Its fused rescale+normalize, `(x - mean/rescale_factor) /
  (std/rescale_factor)` in float32, is reproduced too. Frames come in decoded (PIL images);
  decoding a file is not this module's job.
- Patch order is HF's: merge-block-major (gh/m, gw/m, m, m), each row C x Tp x P x P; a still image
  is repeated Tp times along time; a video's frame count is padded to a multiple of Tp with copies
  of its last frame.
- Per-request budgets: every entry point takes min_pixels / max_pixels overriding the config's.
- Deliberate differences from HF, each an ImageError: an image with a zero side or a single pixel
  (HF divides by zero, or blows one pixel up to 56x56), and aspect ratios over 200 (HF's ValueError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from foveal.errors import ConfigError, ImageError
from foveal.processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the area in [min_pixels, max_pixels],
    the aspect ratio kept as closely as possible (HF's smart_resize, same arithmetic)."""
    if height < 1 or width < 1:
        raise ImageError(f"an image of {width}x{height} pixels has no area; send a real picture")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image is {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"is over the limit of {MAX_ASPECT_RATIO}; crop or pad it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenProcessorConfig:
    """One of the image or video preprocessing configs (they differ in their pixel budgets)."""

    min_pixels: int = 56 * 56            # HF size["shortest_edge"]: an area, not an edge
    max_pixels: int = 28 * 28 * 1280     # HF size["longest_edge"]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BICUBIC

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, d: dict, video: bool = False) -> QwenProcessorConfig:
        """From a preprocessor_config.json / video_preprocessor_config.json; absent keys: HF class defaults.
        min_pixels / max_pixels win over size{shortest_edge, longest_edge}, as in HF's __init__."""
        base = VIDEO_DEFAULTS if video else IMAGE_DEFAULTS
        v = {k: x for k, x in d.items() if x is not None}
        size = v.get("size") or {}
        if not isinstance(size, dict):
            raise ConfigError(f"size must be {{'shortest_edge': MIN_PIXELS, 'longest_edge': MAX_PIXELS}}, got {size!r}")
        fields = {
            "min_pixels": v.get("min_pixels", size.get("shortest_edge", base.min_pixels)),
            "max_pixels": v.get("max_pixels", size.get("longest_edge", base.max_pixels)),
        }
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "do_resize",
                    "do_rescale", "do_normalize", "resample"):
            if key in v:
                fields[key] = v[key]
        for key in ("image_mean", "image_std"):
            if key in v:
                values = v[key]
                if isinstance(values, (int, float)):
                    values = (values,) * 3
                if not isinstance(values, (list, tuple)) or len(values) != 3:
                    raise ConfigError(f"{key} needs one value per RGB channel, got {values!r}")
                fields[key] = tuple(float(x) for x in values)
        return replace(base, **fields)

    def __post_init__(self):
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"processor {key} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"processor min_pixels={self.min_pixels} is above max_pixels={self.max_pixels}")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"processor image_std {self.image_std} has a zero")

    def budget(self, min_pixels: int | None, max_pixels: int | None) -> QwenProcessorConfig:
        """This config with a request's own pixel budget (None keeps the config's)."""
        if min_pixels is None and max_pixels is None:
            return self
        return replace(self, min_pixels=self.min_pixels if min_pixels is None else min_pixels,
                       max_pixels=self.max_pixels if max_pixels is None else max_pixels)


IMAGE_DEFAULTS = QwenProcessorConfig()  # Qwen2VLImageProcessorPil class attributes
VIDEO_DEFAULTS = QwenProcessorConfig(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)  # Qwen2VLVideoProcessor


def resized_size(height: int, width: int, cfg: QwenProcessorConfig = IMAGE_DEFAULTS,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to (its own size without do_resize)."""
    cfg = cfg.budget(min_pixels, max_pixels)
    _check_area(height, width)
    if not cfg.do_resize:
        if height % cfg.factor or width % cfg.factor:
            raise ImageError(f"image is {width}x{height}; without do_resize both sides must be multiples of "
                             f"{cfg.factor} (patch_size * merge_size)")
        return height, width
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


def image_grid(height: int, width: int, cfg: QwenProcessorConfig = IMAGE_DEFAULTS,
               min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int, int]:
    """grid_thw (1, h/P, w/P) of an image of this size, before any pixel is read."""
    h, w = resized_size(height, width, cfg, min_pixels, max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def image_token_count(height: int, width: int, cfg: QwenProcessorConfig = IMAGE_DEFAULTS,
                      min_pixels: int | None = None, max_pixels: int | None = None) -> int:
    """LM tokens an image of this size takes: (h / 28) * (w / 28) after smart_resize."""
    _, gh, gw = image_grid(height, width, cfg, min_pixels, max_pixels)
    return gh * gw // cfg.merge_size ** 2


def process_image(image: Image.Image, cfg: QwenProcessorConfig = IMAGE_DEFAULTS,
                  min_pixels: int | None = None, max_pixels: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One PIL image -> (pixel_values (gh*gw, C*Tp*P*P) float32, grid_thw (1, 3) long), as
    Qwen2VLImageProcessorPil computes them."""
    cfg = cfg.budget(min_pixels, max_pixels)
    rgb = to_rgb(image)
    height, width = resized_size(rgb.height, rgb.width, cfg)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), resample=cfg.resample)
    pixels = np.asarray(rgb).transpose(2, 0, 1)  # (3, H, W) uint8
    if cfg.do_rescale:  # transformers.image_transforms.rescale: float64 product, cast to float32
        out = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        out = pixels.astype(np.float32)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(cfg.image_std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    frames = torch.from_numpy(np.ascontiguousarray(out))[None].expand(cfg.temporal_patch_size, -1, -1, -1)
    return _patchify(frames, cfg)


def process_images(images: list, cfg: QwenProcessorConfig = IMAGE_DEFAULTS,
                   min_pixels: int | None = None, max_pixels: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> concatenated pixel_values and image_grid_thw (n, 3), in order."""
    if not images:
        raise ImageError("no images to process")
    parts = [process_image(im, cfg, min_pixels, max_pixels) for im in images]
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


# ----------------------------------------------------------------------------- video


@dataclass(frozen=True)
class ProcessedVideo:
    pixel_values: torch.Tensor    # (t*h*w, C*Tp*P*P) float32
    grid_thw: torch.Tensor        # (1, 3) long
    second_per_grid: float        # seconds one temporal grid step spans (Qwen2.5-VL time positions)
    frame_indices: list[int]      # which input frames were used, before padding to a multiple of Tp


def sample_frame_indices(total: int, temporal_patch_size: int = 2, source_fps: float | None = None,
                         fps: float | None = None, num_frames: int | None = None,
                         min_frames: int = 4, max_frames: int = 768) -> list[int]:
    """Qwen2VLVideoProcessor.sample_frames: uniform indices for `num_frames` or `fps` frames a second."""
    if fps is not None and num_frames is not None:
        raise ImageError("sample a video by fps or by num_frames, not both")
    if num_frames is not None:
        num_frames = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if source_fps is None:
            raise ImageError("sampling a video at a given fps needs the video's own frame rate (source_fps)")
        max_frames = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
        num_frames = total / source_fps * fps
        num_frames = min(max(num_frames, min_frames), max_frames, total)
        num_frames = math.floor(num_frames / temporal_patch_size) * temporal_patch_size
    if num_frames is None:
        return list(range(total))
    if num_frames > total:
        raise ImageError(f"cannot sample {num_frames} frames from a video of {total}; ask for fewer")
    if num_frames < 1:
        raise ImageError(f"sampling leaves no frames of a video of {total} (temporal_patch_size="
                         f"{temporal_patch_size}); send more frames or a higher fps")
    return torch.arange(0, total, total / num_frames).int().tolist()


def process_video(frames: list, cfg: QwenProcessorConfig = VIDEO_DEFAULTS, source_fps: float | None = None,
                  fps: float | None = None, num_frames: int | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None) -> ProcessedVideo:
    """Decoded frames (PIL images of one size) -> pixel_values_videos, video_grid_thw, as
    Qwen2VLVideoProcessor computes them. fps / num_frames sample frames (HF do_sample_frames)."""
    cfg = cfg.budget(min_pixels, max_pixels)
    if not frames:
        raise ImageError("a video needs at least one frame")
    if fps is not None or num_frames is not None:
        indices = sample_frame_indices(len(frames), cfg.temporal_patch_size, source_fps, fps, num_frames)
    else:
        indices = list(range(len(frames)))
    rgb = [to_rgb(frames[i]) for i in indices]
    sizes = {f.size for f in rgb}
    if len(sizes) > 1:
        raise ImageError(f"video frames differ in size {sorted(sizes)}; every frame must be the same size")
    width, height = rgb[0].size
    video = torch.from_numpy(np.stack([np.asarray(f) for f in rgb])).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    new_h, new_w = resized_size(height, width, cfg)
    if cfg.do_resize and (new_h, new_w) != (height, width):
        # torchvision resize_image, bicubic on a CPU uint8 tensor: torch's native uint8 kernel
        video = F.interpolate(video, size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=True)
    out = video.float()
    if cfg.do_rescale and cfg.do_normalize:  # HF's fused form: mean and std scaled by 1 / rescale_factor
        mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
        std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
        out = (out - mean[:, None, None]) / std[:, None, None]
    elif cfg.do_normalize:
        out = (out - torch.tensor(cfg.image_mean)[:, None, None]) / torch.tensor(cfg.image_std)[:, None, None]
    elif cfg.do_rescale:
        out = out * cfg.rescale_factor
    if pad := -out.shape[0] % cfg.temporal_patch_size:
        out = torch.cat([out, out[-1:].expand(pad, -1, -1, -1)])
    pixel_values, grid = _patchify(out, cfg)
    # Qwen2_5_VLProcessor: temporal_patch_size / sampled fps; HF assumes 24 fps when none is known
    sampled_fps = len(indices) / len(frames) * source_fps if source_fps else 24
    return ProcessedVideo(pixel_values, grid, cfg.temporal_patch_size / sampled_fps, indices)


def _check_area(height: int, width: int) -> None:
    if height * width <= 1:
        raise ImageError(f"image is {width}x{height} pixels, too small to hold a picture; "
                         f"send one of at least 2 pixels")


def _patchify(frames: torch.Tensor, cfg: QwenProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C, H, W) float32, T a multiple of Tp -> ((T/Tp)*gh*gw, C*Tp*P*P), grid (1, 3)."""
    t, c, h, w = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, Tp, P, P)
    return x.reshape(gt * gh * gw, c * tp * p * p).contiguous(), torch.tensor([[gt, gh, gw]])
