"""Decode, validate and preprocess images for LLaVA-style vision encoders.

Design decisions
- One entry point, `load_image`, for every way a user hands over an image (path, bytes,
  base64, data URI, PIL image). Every failure becomes an `ImageError` that names the
  problem; Pillow's OSError / UnidentifiedImageError / ValueError never escape.
- Limits are checked from the header, before any pixel is decoded. We run Pillow's plugin
  loop ourselves (the same loop `Image.open` runs) rather than `Image.open`, because
  `Image.open` applies Pillow's global MAX_IMAGE_PIXELS first (a warning above ~89 MP, an
  error above ~179 MP): that would pre-empt our limit and hide the image's size. Nothing
  global in Pillow is changed.
- Only common photo formats are decoded (`_ALLOWED_FORMATS`); exotic ones (EPS shells out to
  Ghostscript, PSD, ...) are refused by name, which keeps the attack surface of a server small.
- Animated images: the first frame. EXIF orientation is applied, as phone photos need it.
- RGB conversion mirrors `transformers.image_transforms.convert_to_rgb`: anything with an
  alpha band or a transparency key is composited onto white. One deliberate difference:
  16-bit greyscale, which Pillow (and so HF) clips at 255 (nearly white), is scaled by 1/257.
- Preprocessing mirrors transformers' PIL backend (`CLIPImageProcessorPil`, ...; what
  `AutoImageProcessor` picks without torchvision, and numerically the classic processors):
  PIL resize on uint8, floor-division centre crop, rescale in float64 cast to float32, then
  normalize in float32. The torchvision backend resizes differently and is not matched.
- The LLaVA-1.5 pad colour is `int(mean * 255)` = (122, 116, 104), as in HF and in the original
  `expand2square`: truncation, not rounding.
- `LoadedImage.sha256` hashes decoded pixels, so one picture sent as a PNG path, bytes or a
  data URI keys the same entry in the image-embedding cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from foveal.errors import ConfigError, ImageError
from foveal.processing import anyres

_ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")
# Errors by which a Pillow plugin says "this file is not mine" (same list as Image.open).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)
# What Pillow raises on corrupt or truncated data while decoding.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                  KeyError, struct.error, MemoryError, Image.DecompressionBombError)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- loading


@dataclass
class VideoLimits:
    """Checked from the container's header (processing/video.py) before any frame is decoded."""
    max_frames: int = 256                    # frames the model sees, after sampling
    max_duration_s: float = 600.0            # the source's length
    max_pixels_per_frame: int = 3840 * 2160
    max_bytes: int = 256 * 1024 * 1024       # encoded size


@dataclass
class ImageLimits:
    max_pixels: int = 50_000_000  # width * height, from the header, before decoding
    max_bytes: int = 64 * 1024 * 1024  # encoded size
    min_side: int = 8
    video: VideoLimits = field(default_factory=VideoLimits)   # a video's (its frames also keep min_side)


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, fully decoded
    sha256: str  # over the decoded RGB pixels and the size
    width: int
    height: int


def load_image(source, limits: ImageLimits | None = None) -> LoadedImage:
    """Read, validate and decode one image from any of the accepted kinds of source."""
    limits = limits or ImageLimits()
    if isinstance(source, Image.Image):
        image = _from_pil(source, limits)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), limits, "image data")
    elif isinstance(source, Path):
        image = _decode(_read_file(source, limits), limits, f"file {str(source)!r}")
    elif isinstance(source, str):
        image = _from_string(source, limits)
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}; pass a path, "
                         f"bytes, a base64 string, a data URI or a PIL image")
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode() + rgb.tobytes())
    return LoadedImage(image=rgb, sha256=digest.hexdigest(), width=rgb.width, height=rgb.height)


def image_size(path: Path, limits: ImageLimits | None = None) -> tuple[int, int]:
    """(height, width) of an image file as `load_image` would return it (EXIF orientation applied),
    from its header (a PNG is decoded when its EXIF block may follow the pixels, as Pillow's getexif
    does). Training reads it to count an anyres image's tokens."""
    limits = limits or ImageLimits()
    origin = f"file {str(path)!r}"
    image = _open_header(_read_file(Path(path), limits), _ALLOWED_FORMATS, origin)
    _check_size(image.size, limits)
    width, height = image.size
    try:
        turned = image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)   # exif_transpose swaps the sides
    except _DECODE_ERRORS:
        turned = False                     # as _apply_exif_orientation: a bad EXIF block is ignored
    return (width, height) if turned else (height, width)


def _from_string(text: str, limits: ImageLimits) -> Image.Image:
    if text.startswith("data:"):
        return _decode(_parse_data_uri(text, limits), limits, "data URI")
    if os.path.isfile(text):
        return _decode(_read_file(Path(text), limits), limits, f"file {text!r}")
    if os.path.isdir(text):
        raise ImageError(f"{text!r} is a directory, not an image file")
    data = _decode_base64(text, limits)
    if data is None:
        raise ImageError(f"{_preview(text)} is neither an existing file nor valid base64")
    # A short word like "/tmp/cat" is valid base64 too; say both readings failed.
    return _decode(data, limits, f"{_preview(text)} (no such file; read as base64)")


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    try:
        if not path.exists():
            raise ImageError(f"no such image file: {str(path)!r}")
        if path.is_dir():
            raise ImageError(f"{str(path)!r} is a directory, not an image file")
        size = path.stat().st_size
        _check_byte_count(size, limits)  # before reading it all into memory
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image file {str(path)!r}: {e.strerror or e}") from e


def _parse_data_uri(uri: str, limits: ImageLimits) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageError("data URI has no ',' separating its header from its data")
    media_type, *params = [p.strip().lower() for p in header[len("data:"):].split(";")]
    if not media_type.startswith("image/"):
        named = repr(media_type) if media_type else "none (text/plain by default)"
        raise ImageError(f"data URI has media type {named}, not image/*")
    if "base64" not in params:
        raise ImageError("data URI is not base64-encoded (expected ';base64,' in its header)")
    data = _decode_base64(payload, limits)
    if data is None:
        raise ImageError("data URI payload is not valid base64")
    return data


def _decode_base64(text: str, limits: ImageLimits) -> bytes | None:
    """Strict base64 (standard or URL-safe, padding optional); None when it is not base64."""
    compact = "".join(text.split())
    _check_byte_count(len(compact) * 3 // 4, limits)  # before allocating the decoded bytes
    if not compact:
        return None
    compact = compact.translate(str.maketrans("-_", "+/")) + "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_byte_count(n: int, limits: ImageLimits) -> None:
    if n > limits.max_bytes:
        raise ImageError(f"image data is {n} bytes, over the limit of {limits.max_bytes} bytes")


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    (width, height), pixels = size, size[0] * size[1]
    if pixels > limits.max_pixels:
        raise ImageError(f"image is {width}x{height} = {pixels} pixels, "
                         f"over the limit of {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise ImageError(f"image is {width}x{height}, smaller than the minimum of "
                         f"{limits.min_side} pixels per side")


def probe_image(data: bytes, limits: ImageLimits | None = None, origin: str = "image data") -> tuple[str, int, int]:
    """(format, width, height) of encoded image bytes, read from the header alone, after the checks
    `load_image` makes before it decodes a pixel (size in bytes, format, pixel count, minimum side).
    The server's upload route refuses a bad file with it before queueing the request."""
    image = _checked_header(data, limits or ImageLimits(), origin)
    return image.format, image.width, image.height


def _checked_header(data: bytes, limits: ImageLimits, origin: str) -> Image.Image:
    if not data:
        raise ImageError(f"{origin} is empty (0 bytes)")
    _check_byte_count(len(data), limits)
    image = _open_header(data, _ALLOWED_FORMATS, origin)
    _check_size(image.size, limits)  # from the header: nothing is decoded yet
    return image


def _decode(data: bytes, limits: ImageLimits, origin: str) -> Image.Image:
    image = _checked_header(data, limits, origin)
    try:
        image.load()  # the first frame of an animation
    except Image.DecompressionBombError as e:  # Pillow's cap, if max_pixels was set above it
        raise ImageError(f"{origin} is over the pixel limit: {_bomb_pixels(e)}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{origin} is truncated or corrupt ({image.format}): {e}") from e
    return _apply_exif_orientation(image)


def _open_header(data: bytes, formats: tuple[str, ...], origin: str) -> Image.Image:
    """Image.open's plugin loop minus its global pixel check (see the module docstring)."""
    Image.init()  # registers every plugin; idempotent
    prefix = data[:16]
    for name in [f for f in Image.ID if f in formats]:
        factory, accept = Image.OPEN[name]
        try:
            verdict = accept(prefix) if accept else True
        except Exception:  # noqa: BLE001 - some plugins' checks fail on very short data (struct.error)
            verdict = False
        if isinstance(verdict, str) or not verdict:  # a str is Pillow's "mine, but unsupported"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except _NOT_THIS_FORMAT:
            continue
        except Image.DecompressionBombError as e:  # a plugin that checks inside its header
            raise ImageError(f"{origin} is over the pixel limit: {_bomb_pixels(e)}") from e
        except _DECODE_ERRORS as e:
            raise ImageError(f"{origin} has a corrupt {name} header: {e}") from e
    if formats != tuple(Image.ID):  # name the format we refuse, if Pillow knows it
        try:
            other = _open_header(data, tuple(Image.ID), origin).format
        except ImageError:
            other = None
        if other:
            raise ImageError(f"{origin} is in {other} format, which foveal does not read "
                             f"(supported: {', '.join(_ALLOWED_FORMATS)})")
    raise ImageError(f"{origin} is not an image in a format foveal reads "
                     f"(it starts with {data[:8]!r})")


def _bomb_pixels(error: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{found.group(1)} pixels" if found else str(error)


_EXIF_ORIENTATION = 0x0112


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        # A malformed EXIF block should not make a readable picture unreadable.
        return image


def _from_pil(image: Image.Image, limits: ImageLimits) -> Image.Image:
    _check_size(image.size, limits)
    try:
        image.load()  # a lazily opened image may still be truncated
    except _DECODE_ERRORS as e:
        raise ImageError(f"PIL image could not be decoded: {e}") from e
    return _apply_exif_orientation(image)


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ----------------------------------------------------------------------------- RGB


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB as transformers' convert_to_rgb does (16-bit excepted)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    # Mirrors transformers.image_transforms.convert_to_rgb (PIL branch).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> RGB clips every value above 255 (HF inherits this); scale instead.
    # Mode "I" holding only 0..255 is treated as 8-bit data in a wide container.
    values = np.asarray(image, dtype=np.int64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = np.rint(np.clip(values, 0, 65535) / 257.0)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")


# ----------------------------------------------------------------------------- preprocessing


@dataclass
class ImageProcessorConfig:
    size: dict  # {"shortest_edge": S} or {"height": H, "width": W}
    crop_size: dict | None  # {"height": H, "width": W} or None
    do_center_crop: bool
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int  # PIL resample id; 3 = bicubic
    mode: str = "crop"  # "crop" | "pad" (LLaVA-1.5 pad to square first) | "resize" (no crop)
    grid_pinpoints: tuple | None = None  # LLaVA-NeXT anyres tiling ((H, W), ...); None: one view per image

    def __post_init__(self):
        self.size = _size_dict(self.size, square=False, what="size")
        if self.crop_size is not None:
            self.crop_size = _size_dict(self.crop_size, square=True, what="crop_size")
        self.image_mean = _three(self.image_mean, "image_mean")
        self.image_std = _three(self.image_std, "image_std")
        if self.mode not in ("crop", "pad", "resize"):
            raise ConfigError(f"image mode {self.mode!r} is not one of 'crop', 'pad', 'resize'")
        if self.do_center_crop and (self.crop_size is None or self.mode == "resize"):
            raise ConfigError("do_center_crop needs a crop_size and a mode other than 'resize'")
        if self.grid_pinpoints is not None:
            self.grid_pinpoints = anyres.check_pinpoints(self.grid_pinpoints)
            if self.mode != "crop" or not self.do_resize or "shortest_edge" not in self.size:
                raise ConfigError("anyres tiling (image_grid_pinpoints) needs the CLIP crop preprocessing "
                                  "(a shortest-edge resize and a centre crop)")

    @classmethod
    def from_hf(cls, d: dict) -> ImageProcessorConfig:
        """From a preprocessor_config.json; absent (or null) keys take the HF class defaults."""
        kind = d.get("image_processor_type") or d.get("feature_extractor_type") or "CLIP"
        family = _processor_family(kind)
        v = {**_HF_DEFAULTS[family], **{k: x for k, x in d.items() if x is not None}}
        mode = "crop" if v["do_center_crop"] else "resize"
        if family == "llava" and v["do_pad"]:  # only LLaVA's do_pad means "pad to square"
            mode = "pad"                       # (LLaVA-NeXT's pads a batch's tile counts: no effect here)
        return cls(size=v["size"], crop_size=v["crop_size"],
                   do_center_crop=bool(v["do_center_crop"]), do_resize=bool(v["do_resize"]),
                   do_rescale=bool(v["do_rescale"]), do_normalize=bool(v["do_normalize"]),
                   rescale_factor=float(v["rescale_factor"]), image_mean=v["image_mean"],
                   image_std=v["image_std"], resample=int(v["resample"]), mode=mode,
                   grid_pinpoints=v.get("image_grid_pinpoints"))

    @classmethod
    def for_vision(cls, kind: str, image_size: int) -> ImageProcessorConfig:
        """Defaults for a vision tower with no processor config: CLIP crops, SigLIP resizes."""
        if kind == "clip":
            return cls.from_hf({"image_processor_type": "CLIPImageProcessor",
                                "size": {"shortest_edge": image_size}, "crop_size": image_size})
        if kind == "siglip":
            return cls.from_hf({"image_processor_type": "SiglipImageProcessor",
                                "size": {"height": image_size, "width": image_size}})
        raise ConfigError(f"no image preprocessing defaults for vision kind {kind!r} "
                          f"(known: 'clip', 'siglip')")

    def output_size(self) -> tuple[int, int]:
        """(H, W) of the pixel tensor; a ConfigError when it depends on the image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        if self.do_resize and self.mode == "pad":  # a square resized by its shortest edge
            return self.size["shortest_edge"], self.size["shortest_edge"]
        raise ConfigError("this image processor config has no fixed output size "
                          "(no centre crop and no fixed height/width)")


_CLIP_DEFAULTS = dict(
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
    do_resize=True, do_rescale=True, do_normalize=True, rescale_factor=1 / 255,
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample=3, do_pad=False,
)
# Class attributes of transformers' CLIP/Llava/SiglipImageProcessor (v5, both backends).
_HF_DEFAULTS = {
    "clip": _CLIP_DEFAULTS,
    "llava": _CLIP_DEFAULTS,
    "siglip": dict(_CLIP_DEFAULTS, size={"height": 224, "width": 224}, crop_size=None,
                   do_center_crop=False, image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
    "llava_next": dict(_CLIP_DEFAULTS, do_pad=True, image_grid_pinpoints=anyres.LLAVA_NEXT_PINPOINTS),
}


def _processor_family(kind: str) -> str:
    # v5 names the backend by a suffix ("...Fast": torchvision, "...Pil"); same config keys.
    base = kind.removesuffix("Fast").removesuffix("Pil")
    family = {"CLIPImageProcessor": "clip", "CLIPFeatureExtractor": "clip",
              "LlavaImageProcessor": "llava", "SiglipImageProcessor": "siglip",
              "LlavaNextImageProcessor": "llava_next"}.get(base)
    if family:
        return family
    raise ConfigError(f"image processor {kind!r} is not supported (supported: CLIPImageProcessor, "
                      f"LlavaImageProcessor, LlavaNextImageProcessor, SiglipImageProcessor)")


def _size_dict(size, square: bool, what: str) -> dict:
    # Legacy forms, as transformers' get_size_dict reads them. CLIP, LLaVA and SigLIP all
    # set default_to_square=False, so a bare int `size` is a shortest edge there.
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and set(size) in ({"shortest_edge"}, {"height", "width"}):
        if square and "shortest_edge" in size:
            raise ConfigError(f"{what} must give height and width, got {size}")
        return {k: int(v) for k, v in size.items()}
    raise ConfigError(f"{what} must be {{'shortest_edge': S}} or {{'height': H, 'width': W}}, "
                      f"got {size!r}")


def _three(values, what: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = (values,) * 3
    if len(values) != 3:
        raise ConfigError(f"{what} needs one value per RGB channel, got {values!r}")
    return tuple(float(v) for v in values)


def preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> torch.Tensor:
    """One image -> (3, H, W) float32, as transformers' PIL-backend processors compute it."""
    rgb = to_rgb(image)
    if cfg.mode == "pad":
        rgb = _pad_to_square(rgb, tuple(int(m * 255) for m in cfg.image_mean))
    if cfg.do_resize:
        height, width = _resized_size(rgb.height, rgb.width, cfg.size)
        rgb = rgb.resize((width, height), resample=cfg.resample)
    pixels = np.asarray(rgb)  # (H, W, 3) uint8
    if cfg.do_center_crop:
        pixels = _center_crop(pixels, cfg.crop_size["height"], cfg.crop_size["width"])
    pixels = _rescale_and_normalize(pixels, cfg)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


def preprocess_views(image: Image.Image, cfg: ImageProcessorConfig) -> torch.Tensor:
    """One image -> its anyres views (1 + tiles, 3, S, S): the base view, then the tiles row-major."""
    if cfg.grid_pinpoints is None:
        raise ConfigError("this image processor has no image_grid_pinpoints: it does not tile")
    tile = cfg.crop_size["height"] if cfg.do_center_crop else cfg.size["shortest_edge"]
    base = cfg.size["shortest_edge"]
    views = anyres.tile_views(to_rgb(image), cfg.grid_pinpoints, tile, base, cfg.resample)
    return torch.stack([preprocess(v, cfg) for v in views])


def preprocess_batch(images: list, cfg: ImageProcessorConfig) -> torch.Tensor:
    """Images (PIL or LoadedImage) -> (N, 3, H, W); sizes must agree, as the encoder needs."""
    tensors = [preprocess(im.image if isinstance(im, LoadedImage) else im, cfg) for im in images]
    if not tensors:
        return torch.empty((0, 3, *cfg.output_size()), dtype=torch.float32)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ConfigError(f"cannot batch images preprocessed to different sizes {sorted(shapes)}; "
                          f"the processor config needs a centre crop or a fixed height/width")
    return torch.stack(tensors)


def _pad_to_square(rgb: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    # LlavaImageProcessor.pad_to_square / LLaVA's expand2square: centred, floor offsets.
    if rgb.width == rgb.height:
        return rgb
    side = max(rgb.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return canvas


def _resized_size(height: int, width: int, size: dict) -> tuple[int, int]:
    # transformers.image_transforms.get_resize_output_image_size(default_to_square=False):
    # the long edge is truncated, int(S * long / short), not rounded.
    if "height" in size:
        return size["height"], size["width"]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    # transformers.image_transforms.center_crop: floor offsets; an image smaller than the
    # crop is first zero-padded (ceil on the top/left) so the result is always crop-sized.
    height, width = pixels.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _rescale_and_normalize(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    # transformers.image_transforms.rescale multiplies in float64 and casts to float32;
    # normalize then works in float32 with float32 mean/std. Same order, same dtypes.
    if cfg.do_rescale:
        out = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        out = pixels.astype(np.float32)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)
        std = np.array(cfg.image_std, dtype=np.float32)
        out = (out - mean) / std
    return out
