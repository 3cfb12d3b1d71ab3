"""foveal.processing.images: loading, limits, RGB conversion and parity with transformers.

Reference numbers come from transformers' PIL-backend processors (CLIPImageProcessorPil, ...),
which are what AutoImageProcessor runs when torchvision is absent, built tiny in each test.
"""

import base64
import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    SiglipImageProcessorPil,
)
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

from foveal.errors import ConfigError, ImageError
from foveal.processing.images import (
    ImageLimits,
    ImageProcessorConfig,
    LoadedImage,
    image_size,
    load_image,
    preprocess,
    preprocess_batch,
    to_rgb,
)

# ----------------------------------------------------------------------------- helpers


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: every resample tap and every channel matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     (xx + yy) * 127 / max(width + height - 2, 1)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def hf_pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(images=[image], return_tensors="np")["pixel_values"][0]


def assert_parity(processor, image: Image.Image) -> None:
    cfg = ImageProcessorConfig.from_hf(processor.to_dict())
    ours = preprocess(image, cfg)
    ref = hf_pixels(processor, image)
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape == (3, *cfg.output_size())
    assert np.abs(ours.numpy() - ref).max() <= 1e-5


# ----------------------------------------------------------------------------- parity with HF

PROCESSORS = {
    "clip": lambda s: CLIPImageProcessorPil(size={"shortest_edge": s},
                                            crop_size={"height": s, "width": s}),
    "clip-odd-crop": lambda s: CLIPImageProcessorPil(size={"shortest_edge": s},
                                                     crop_size={"height": s + 7, "width": s - 5}),
    "llava-pad": lambda s: LlavaImageProcessorPil(size={"shortest_edge": s},
                                                  crop_size={"height": s, "width": s}, do_pad=True),
    "siglip": lambda s: SiglipImageProcessorPil(size={"height": s, "width": s}),
}
ODD_SIZES = [(337, 251), (251, 337), (17, 1000), (1000, 17), (500, 333), (40, 40)]


@pytest.mark.parametrize("kind", PROCESSORS)
@pytest.mark.parametrize("side", [32, 336])
@pytest.mark.parametrize("width,height", ODD_SIZES)
def test_pixel_values_match_transformers(kind, side, width, height):
    assert_parity(PROCESSORS[kind](side), photo(width, height, seed=width + height))


def test_image_smaller_than_crop_is_zero_padded_like_transformers():
    processor = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 48, "width": 40})
    assert_parity(processor, photo(33, 21))


LLAVA_HF_CONFIG = {  # llava-hf/llava-1.5-7b-hf, size shrunk to keep the test fast
    "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 32},
}
SIGLIP_HF_CONFIG = {  # google/siglip-so400m-patch14-384, size shrunk
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 32, "width": 32},
}


@pytest.mark.parametrize("config", [LLAVA_HF_CONFIG, SIGLIP_HF_CONFIG,
                                    dict(LLAVA_HF_CONFIG, image_processor_type="LlavaImageProcessor",
                                         do_pad=True)])
def test_matches_what_auto_image_processor_runs(tmp_path, config):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = AutoImageProcessor.from_pretrained(tmp_path)
    if processor.backend != "pil":
        pytest.skip("torchvision is installed; foveal matches the PIL backend, not this one")
    cfg = ImageProcessorConfig.from_hf(config)
    for image in (photo(337, 251), photo(17, 100)):
        ours = preprocess(image, cfg).numpy()
        assert np.abs(ours - hf_pixels(processor, image)).max() <= 1e-5


def test_llava_pad_colour_is_truncated_mean():
    # HF and the original LLaVA pad with int(mean * 255) = (122, 116, 104), not round().
    cfg = ImageProcessorConfig.from_hf({"image_processor_type": "LlavaImageProcessor",
                                        "do_pad": True, "do_rescale": False, "do_normalize": False,
                                        "size": {"shortest_edge": 40},
                                        "crop_size": {"height": 40, "width": 40}})
    out = preprocess(Image.new("RGB", (40, 10), (0, 0, 0)), cfg)
    assert out[:, 0, 0].tolist() == [122.0, 116.0, 104.0]
    assert out[:, 20, 20].tolist() == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kind", ["CLIPImageProcessor", "CLIPImageProcessorFast",
                                  "CLIPImageProcessorPil", "CLIPFeatureExtractor",
                                  "LlavaImageProcessor", "LlavaImageProcessorPil"])
def test_from_hf_fills_clip_class_defaults(kind):
    cfg = ImageProcessorConfig.from_hf({"image_processor_type": kind, "image_mean": None})
    assert cfg.size == {"shortest_edge": 224} and cfg.crop_size == {"height": 224, "width": 224}
    assert (cfg.mode, cfg.resample, cfg.output_size()) == ("crop", 3, (224, 224))
    assert cfg.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert cfg.do_resize and cfg.do_center_crop and cfg.do_rescale and cfg.do_normalize


@pytest.mark.parametrize("kind", ["SiglipImageProcessor", "SiglipImageProcessorFast",
                                  "SiglipImageProcessorPil"])
def test_from_hf_fills_siglip_class_defaults(kind):
    cfg = ImageProcessorConfig.from_hf({"image_processor_type": kind})
    assert cfg.size == {"height": 224, "width": 224} and cfg.crop_size is None
    assert (cfg.mode, cfg.do_center_crop, cfg.output_size()) == ("resize", False, (224, 224))
    assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)


def test_from_hf_reads_legacy_int_sizes_and_do_pad():
    cfg = ImageProcessorConfig.from_hf({"feature_extractor_type": "CLIPFeatureExtractor",
                                        "size": 336, "crop_size": 336})
    assert cfg.size == {"shortest_edge": 336} and cfg.crop_size == {"height": 336, "width": 336}
    padded = ImageProcessorConfig.from_hf({"image_processor_type": "LlavaImageProcessor",
                                           "do_pad": True})
    assert padded.mode == "pad"


@pytest.mark.parametrize("kind,image_size,reference", [
    ("clip", 336, lambda: CLIPImageProcessorPil(size={"shortest_edge": 336},
                                                crop_size={"height": 336, "width": 336})),
    ("siglip", 384, lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384})),
])
def test_for_vision_equals_the_hf_processor_of_that_kind(kind, image_size, reference):
    cfg = ImageProcessorConfig.for_vision(kind, image_size)
    assert cfg == ImageProcessorConfig.from_hf(reference().to_dict())
    assert cfg.output_size() == (image_size, image_size)


@pytest.mark.parametrize("build", [
    lambda: ImageProcessorConfig.from_hf({"image_processor_type": "Qwen2VLImageProcessor"}),
    lambda: ImageProcessorConfig.from_hf({"image_processor_type": "CLIPImageProcessor",
                                          "size": {"longest_edge": 10}}),
    lambda: ImageProcessorConfig.for_vision("dino", 224),
    lambda: ImageProcessorConfig.for_vision("clip", 32).__class__(
        **{**vars(ImageProcessorConfig.for_vision("clip", 32)), "mode": "squash"}),
    lambda: ImageProcessorConfig.from_hf({"image_processor_type": "CLIPImageProcessor",
                                          "do_center_crop": False}).output_size(),
])
def test_bad_configs_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()


# ----------------------------------------------------------------------------- batches


def test_preprocess_batch_stacks_pil_and_loaded_images():
    cfg = ImageProcessorConfig.for_vision("clip", 32)
    images = [photo(337, 251), load_image(photo(17, 100, seed=3))]
    batch = preprocess_batch(images, cfg)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0], preprocess(images[0], cfg))
    assert torch.equal(batch[1], preprocess(images[1].image, cfg))
    assert preprocess_batch([], cfg).shape == (0, 3, 32, 32)


def test_preprocess_batch_refuses_images_of_different_sizes():
    cfg = ImageProcessorConfig.from_hf({"image_processor_type": "CLIPImageProcessor",
                                        "size": {"shortest_edge": 16}, "do_center_crop": False})
    with pytest.raises(ConfigError, match="different sizes"):
        preprocess_batch([photo(32, 16), photo(16, 16)], cfg)


# ----------------------------------------------------------------------------- modes


def with_transparency(image: Image.Image, key) -> Image.Image:
    image.info["transparency"] = key
    return image


MODE_IMAGES = {
    "RGBA": lambda: Image.fromarray(np.dstack([np.asarray(photo(37, 23)),
                                               np.tile(np.arange(37, dtype=np.uint8) * 7, (23, 1))])),
    "LA": lambda: photo(37, 23).convert("L").convert("LA"),
    "P-transparent": lambda: with_transparency(photo(37, 23).convert("P"), 0),
    "P": lambda: photo(37, 23).convert("P"),
    "L": lambda: photo(37, 23).convert("L"),
    "1": lambda: photo(37, 23).convert("1"),
    "CMYK": lambda: photo(37, 23).convert("CMYK"),
}


@pytest.mark.parametrize("mode", MODE_IMAGES)
def test_mode_conversion_matches_transformers(mode):
    image = MODE_IMAGES[mode]()
    expected = hf_convert_to_rgb(image, return_numpy=True)
    assert np.array_equal(np.asarray(to_rgb(image)), expected)
    assert_parity(PROCESSORS["clip"](16), image)


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P-transparent", "PNG"),
                                      ("L", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF")])
def test_loaded_file_modes_match_transformers(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    MODE_IMAGES[mode]().save(path, fmt)
    loaded = load_image(str(path))
    assert loaded.image.mode == "RGB"
    assert np.array_equal(np.asarray(loaded.image),
                          hf_convert_to_rgb(Image.open(path), return_numpy=True))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 100, 255, 256, 1000, 32896, 65534, 65535]] * 8, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255, 32896 -> 128
    loaded = np.asarray(load_image(path).image)
    assert np.array_equal(loaded, np.repeat(expected[..., None], 3, axis=-1))
    # transformers (through Pillow) clips instead: every value above 255 turns white.
    assert hf_convert_to_rgb(Image.open(path), return_numpy=True)[0, 4, 0] == 255


# ----------------------------------------------------------------------------- sources


def test_every_kind_of_source_gives_the_same_pixels_and_hash(tmp_path):
    image = photo(45, 30)
    png = encode(image)
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode()
    sources = [str(path), path, png, bytearray(png), b64, "data:image/png;base64," + b64,
               "data:image/png;base64," + base64.urlsafe_b64encode(png).decode().rstrip("="),
               image, Image.open(path)]
    loaded = [load_image(source) for source in sources]
    assert {item.sha256 for item in loaded} == {loaded[0].sha256}
    for item in loaded:
        assert isinstance(item, LoadedImage) and (item.width, item.height) == (45, 30)
        assert item.image.mode == "RGB" and np.array_equal(np.asarray(item.image), np.asarray(image))
    assert load_image(photo(45, 30, seed=1)).sha256 != loaded[0].sha256


@pytest.mark.parametrize("orientation,transpose", [
    (1, None), (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(tmp_path, orientation, transpose, fmt):
    image = photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone.{fmt.lower()}"
    image.save(path, fmt, exif=exif)
    stored = Image.open(path).convert("RGB")  # JPEG is lossy: compare with what it holds
    expected = stored if transpose is None else stored.transpose(transpose)
    loaded = load_image(path)
    assert loaded.image.size == expected.size == ((40, 20) if orientation < 5 else (20, 40))
    assert np.array_equal(np.asarray(loaded.image), np.asarray(expected))
    assert image_size(path) == (loaded.height, loaded.width)      # from the header, as training counts tokens


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_image(path)
    assert Image.open(path).n_frames == 2
    assert np.asarray(loaded.image)[8, 8].tolist() == [255, 0, 0]


# ----------------------------------------------------------------------------- bad input


def truncated(fmt: str) -> bytes:
    data = encode(photo(64, 64), fmt)
    return data[: len(data) // 2]


def written(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


BAD_SOURCES = {
    "empty bytes": (lambda tmp: b"", "empty"),
    "empty file": (lambda tmp: written(tmp, "empty.png", b""), "empty"),
    "text file": (lambda tmp: written(tmp, "notes.png", b"hello, this is text\n" * 20),
                  "not an image"),
    "pdf": (lambda tmp: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\n", "not an image"),
    "truncated png": (lambda tmp: truncated("PNG"), "truncated"),
    "truncated jpeg": (lambda tmp: written(tmp, "cut.jpg", truncated("JPEG")), "truncated"),
    "unsupported format": (lambda tmp: encode(photo(16, 16), "PCX"), "PCX format"),
    "bad base64": (lambda tmp: "this is not base64!", "neither an existing file nor valid base64"),
    "text data uri": (lambda tmp: "data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
    "uri without base64": (lambda tmp: "data:image/png,abcd", "not base64-encoded"),
    "uri bad payload": (lambda tmp: "data:image/png;base64,@@@@", "not valid base64"),
    "missing Path": (lambda tmp: tmp / "missing.png", "no such image file"),
    "missing str path": (lambda tmp: str(tmp / "missing.png"), "neither an existing file"),
    "directory": (lambda tmp: str(tmp), "directory"),
    "1x1": (lambda tmp: encode(Image.new("RGB", (1, 1))), "1x1, smaller than the minimum of 8"),
    "1x1 PIL": (lambda tmp: Image.new("RGB", (1, 1)), "1x1, smaller than the minimum of 8"),
    "truncated lazy PIL": (lambda tmp: Image.open(written(tmp, "cut.png", truncated("PNG"))),
                           "could not be decoded"),
    "wrong type": (lambda tmp: 42, "cannot read an image from a int"),
}


@pytest.mark.parametrize("name", BAD_SOURCES)
def test_bad_input_raises_image_error_naming_the_problem(tmp_path, name):
    build, message = BAD_SOURCES[name]
    with pytest.raises(ImageError, match=message):
        load_image(build(tmp_path))


@pytest.mark.parametrize("as_base64", [False, True])
def test_too_many_bytes_is_refused(as_base64):
    png = encode(photo(64, 64))
    source = base64.b64encode(png).decode() if as_base64 else png
    with pytest.raises(ImageError, match="bytes, over the limit of 1000 bytes"):
        load_image(source, ImageLimits(max_bytes=1000))


@pytest.mark.parametrize("width,height", [(20000, 20000), (10000, 10000), (8000, 8000)])
@pytest.mark.parametrize("from_file", [False, True])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, width, height, from_file):
    # The file holds almost no pixel data: decoding it would fail as "truncated", so the
    # message below proves the refusal came from the header. Sizes straddle Pillow's own
    # warning (~89 MP) and error (~179 MP) thresholds, neither of which may leak out.
    data = png_header_only(width, height)
    source = written(tmp_path, "bomb.png", data) if from_file else data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as error:
            load_image(source)
    pixels = width * height
    assert str(error.value) == (
        f"image is {width}x{height} = {pixels} pixels, over the limit of 50000000")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_custom_pixel_limit_applies_to_pil_images_too():
    with pytest.raises(ImageError, match="64x64 = 4096 pixels, over the limit of 1000"):
        load_image(photo(64, 64), ImageLimits(max_pixels=1000))
    assert load_image(photo(8, 8), ImageLimits(min_side=8)).width == 8


@pytest.mark.parametrize("data", [b"\xab", b"\xab\xcd", b"\x00\x00\x01", b"BM", b"\x89PNG"])
def test_very_short_data_is_an_image_error(data):
    with pytest.raises(ImageError):
        load_image(data)
