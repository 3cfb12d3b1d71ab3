"""Qwen-VL family parts (config, vision towers, processor, M-RoPE positions) against transformers.

Each parity test builds the transformers reference from a tiny config with seeded random weights in
float32 and compares outputs; each error test checks the typed error and what its message names.
"""

from __future__ import annotations

import json
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from foveal.errors import ConfigError, ImageError, PromptError
from foveal.models.families.qwen2_vl import image_processing as qp
from foveal.models.families.qwen2_vl.config import QwenVisionConfig, mrope_section
from foveal.models.families.qwen2_vl.positions import decode_positions, mrope_cos_sin, rope_index
from foveal.models.families.qwen2_vl.vision import QwenVisionTower

# ----------------------------------------------------------------------------- config


def test_config_defaults_are_hf_class_defaults():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    two, hf2 = QwenVisionConfig.from_hf({}, "qwen2_vl"), Qwen2VLVisionConfig()
    assert (two.depth, two.width, two.out_width, two.num_heads, two.hidden_act) == (
        hf2.depth, hf2.embed_dim, hf2.hidden_size, hf2.num_heads, hf2.hidden_act)
    assert two.intermediate_size == hf2.embed_dim * hf2.mlp_ratio
    assert (two.patch_size, two.temporal_patch_size, two.spatial_merge_size, two.in_channels) == (
        hf2.patch_size, hf2.temporal_patch_size, hf2.spatial_merge_size, hf2.in_channels)
    assert two.rope_theta == hf2.rope_parameters["rope_theta"]
    five, hf5 = QwenVisionConfig.from_hf({}, "qwen2_5_vl"), Qwen2_5_VLVisionConfig()
    assert (five.depth, five.width, five.out_width, five.intermediate_size, five.hidden_act) == (
        hf5.depth, hf5.hidden_size, hf5.out_hidden_size, hf5.intermediate_size, hf5.hidden_act)
    assert (five.window_size, five.fullatt_block_indexes, five.tokens_per_second) == (
        hf5.window_size, tuple(hf5.fullatt_block_indexes), hf5.tokens_per_second)


def test_config_reads_a_real_qwen2_vl_2b_vision_config():
    # Qwen/Qwen2-VL-2B-Instruct's vision_config as published (legacy in_chans, model_type qwen2_vl)
    cfg = QwenVisionConfig.from_hf({"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                                    "in_chans": 3, "hidden_size": 1536, "patch_size": 14,
                                    "spatial_merge_size": 2, "spatial_patch_size": 14,
                                    "temporal_patch_size": 2, "model_type": "qwen2_vl"}, "qwen2_vl")
    assert (cfg.width, cfg.out_width, cfg.intermediate_size, cfg.head_dim, cfg.patch_dim) == (
        1280, 1536, 5120, 80, 1176)


@pytest.mark.parametrize("kind, vision, named", [
    ("qwen2_vl", {"embed_dim": 30, "num_heads": 4}, "embed_dim=30 is not divisible by num_heads=4"),
    ("qwen2_vl", {"embed_dim": 36, "num_heads": 6}, "multiple of 4"),
    ("qwen2_vl", {"depth": 0}, "vision_config.depth"),
    ("qwen2_vl", {"mlp_ratio": 2.5}, "vision_config.mlp_ratio"),
    ("qwen2_5_vl", {"hidden_act": "relu6"}, "hidden_act 'relu6'"),
    ("qwen2_5_vl", {"depth": 4, "fullatt_block_indexes": [3, 4]}, "fullatt_block_indexes holds 4"),
    ("qwen2_5_vl", {"window_size": 20}, "window_size=20"),
    ("qwen2_5_vl", {"spatial_merge_size": "2"}, "vision_config.spatial_merge_size"),
    ("qwen3_vl", {"num_position_embeddings": 1000}, "not a square"),
])
def test_config_rejects_nonsense_naming_the_key(kind, vision, named):
    with pytest.raises(ConfigError, match=named):
        QwenVisionConfig.from_hf(vision, kind)


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="known: qwen2_vl"):
        QwenVisionConfig.from_hf({}, "qwen9_vl")


def test_mrope_section_reads_rope_parameters_rope_scaling_and_hf_default():
    assert mrope_section({"rope_parameters": {"mrope_section": [16, 24, 24]}}, 128) == (16, 24, 24)
    assert mrope_section({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}, 16) == (2, 3, 3)
    assert mrope_section({}, 128) == (16, 24, 24)
    assert mrope_section({}, 128, kind="qwen3_vl") == (24, 20, 20)


@pytest.mark.parametrize("section, named", [
    ([16, 24, 20], r"\[16, 24, 20\] sums to 60.*head_dim / 2 = 64"),
    ([16, 48], "three non-negative integers"),
    ([16.0, 24, 24], "three non-negative integers"),
    ("16,24,24", "three non-negative integers"),
])
def test_mrope_section_errors_name_the_numbers(section, named):
    with pytest.raises(ConfigError, match=named):
        mrope_section({"rope_parameters": {"mrope_section": section}}, 128)


# ----------------------------------------------------------------------------- vision towers

TINY_VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=4,
                     temporal_patch_size=2, spatial_merge_size=2),
    # window_size 16 px = 2 merged tokens: grids of 3 or 5 merged tokens split into padded windows
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=48, num_heads=4, intermediate_size=40,
                       patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                       fullatt_block_indexes=[1]),
}


def _hf_tower(kind: str):
    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig as Config
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel as Model)
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Model)
    torch.manual_seed(0)
    model = Model._from_config(Config(**TINY_VISION[kind]), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF's init leaves norms at 1 and biases at 0: randomise all
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def towers(request):
    hf = _hf_tower(request.param)
    ours = QwenVisionTower(QwenVisionConfig.from_hf(TINY_VISION[request.param], request.param)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the checkpoint's names, nothing missing or extra
    return hf, ours


@pytest.mark.parametrize("grid", [
    [[1, 4, 6]],                        # one image
    [[1, 4, 6], [1, 8, 4]],             # two images at once: no attention between them
    [[1, 6, 10], [2, 4, 4], [1, 2, 2]],  # a 2-step video between images; 2.5: ragged windows
    [[1, 8, 8]],                        # 2.5: grid a multiple of the window (HF pads an empty window)
])
def test_vision_tower_matches_transformers(towers, grid):
    hf, ours = towers
    grid = torch.tensor(grid)
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod(-1).sum()), ours.cfg.patch_dim)
    with torch.no_grad():
        expected = hf(pixels, grid_thw=grid).pooler_output
        got = ours(pixels, grid)
    assert got.shape == (int(grid.prod(-1).sum()) // 4, 48)
    assert (got - expected).abs().max().item() < 1e-5


def test_images_do_not_attend_to_each_other(towers):
    _, ours = towers
    grid = torch.tensor([[1, 4, 6], [1, 8, 4]])
    torch.manual_seed(2)
    pixels = torch.randn(56, ours.cfg.patch_dim)
    with torch.no_grad():
        both = ours(pixels, grid)
        first = ours(pixels[:24], grid[:1])
    torch.testing.assert_close(both[:6], first, rtol=0, atol=1e-6)


def test_vision_tower_geometry_errors(towers):
    _, ours = towers
    dim = ours.cfg.patch_dim
    with pytest.raises(ImageError, match=r"pixel_values has 20 patch rows but grid_thw \[\[1, 4, 6\]\] "
                                         r"describes 24"):
        ours(torch.zeros(20, dim), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ImageError, match="multiples of spatial_merge_size=2"):
        ours(torch.zeros(15, dim), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ImageError, match=rf"\(patches, {dim}\)"):
        ours(torch.zeros(24, dim + 1), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ImageError, match=r"\(n, 3\)"):
        ours(torch.zeros(24, dim), torch.tensor([1, 4, 6]))
    with pytest.raises(ImageError, match="empty side"):
        ours(torch.zeros(0, dim), torch.tensor([[0, 4, 6]]))


# ----------------------------------------------------------------------------- processor

# odd sizes and aspect ratios; 20x30 is below min_pixels, 3000x2000 above max_pixels, 28x5000 is 178:1
IMAGE_SIZES = [(37, 53), (300, 451), (20, 30), (3000, 2000), (28, 5000), (1, 150), (451, 300)]


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("min_pixels, max_pixels", [(None, None), (3136, 12845056), (256 * 28 * 28, 512 * 28 * 28)])
@pytest.mark.parametrize("height, width", [(h, w) for h in range(1, 400, 37) for w in (1, 29, 55, 310)]
                         + [(3000, 2000), (28, 5000), (10000, 51)])
def test_smart_resize_matches_transformers(height, width, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError):
            smart_resize(height, width, **budget)
        with pytest.raises(ImageError, match="aspect ratio .* over the limit of 200"):
            qp.smart_resize(height, width, **budget)
    else:
        assert qp.smart_resize(height, width, **budget) == smart_resize(height, width, **budget)


def test_auto_image_processor_without_torchvision_is_the_pil_backend(tmp_path):
    pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: transformers picks its torchvision backend")
    except ImportError:
        pass
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR))
    hf = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
    image = _noise(600, 900)
    expected = hf(image, return_tensors="pt")
    pixels, grid = qp.process_image(image, qp.QwenProcessorConfig.from_hf(QWEN2_VL_PREPROCESSOR))
    assert torch.equal(pixels, expected["pixel_values"]) and torch.equal(grid, expected["image_grid_thw"])


# Qwen/Qwen2-VL-7B-Instruct's preprocessor_config.json (max_pixels far above the class default)
QWEN2_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@pytest.mark.parametrize("budget", [{}, {"min_pixels": 64 * 28 * 28, "max_pixels": 96 * 28 * 28}])
def test_process_image_equals_the_hf_image_processor(budget):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(**budget)
    images = [_noise(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES)]
    for image in images:
        expected = hf(image, return_tensors="pt")
        pixels, grid = qp.process_image(image, **budget)
        assert torch.equal(grid, expected["image_grid_thw"])
        assert torch.equal(pixels, expected["pixel_values"])  # bit for bit
        h, w = image.height, image.width
        assert qp.image_token_count(h, w, **budget) == hf.get_number_of_image_patches(h, w) // 4
    pixels, grids = qp.process_images(images, **budget)  # several at once: concatenated in order
    expected = hf(images, return_tensors="pt")
    assert torch.equal(grids, expected["image_grid_thw"]) and torch.equal(pixels, expected["pixel_values"])


def test_process_image_converts_modes_as_hf_does():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rgba = np.random.default_rng(3).integers(0, 256, (61, 47, 4), dtype=np.uint8)
    for image in (Image.fromarray(rgba), Image.fromarray(rgba[..., 0]).convert("L")):
        expected = Qwen2VLImageProcessorPil()(image, return_tensors="pt")
        pixels, grid = qp.process_image(image)
        assert torch.equal(pixels, expected["pixel_values"]) and torch.equal(grid, expected["image_grid_thw"])


def test_token_counts_and_budget():
    assert qp.image_token_count(448, 448) == 256                   # (448/28)^2
    assert qp.image_grid(448, 448) == (1, 32, 32)
    assert qp.smart_resize(20, 30) == (56, 84)                      # raised to min_pixels
    assert qp.image_token_count(20, 30) == 6
    assert qp.smart_resize(3000, 2000) == (1204, 812)                # capped at max_pixels
    assert qp.image_token_count(3000, 2000) == 43 * 29
    assert qp.image_token_count(3000, 2000, max_pixels=256 * 28 * 28) <= 256
    assert qp.image_token_count(100, 100, min_pixels=1024 * 28 * 28) >= 1024


def test_config_from_hf_reads_size_and_pixel_keys():
    cfg = qp.QwenProcessorConfig.from_hf({"size": {"shortest_edge": 1000, "longest_edge": 20000}})
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 20000)
    cfg = qp.QwenProcessorConfig.from_hf({"size": {"shortest_edge": 1000, "longest_edge": 20000},
                                          "max_pixels": 30000})
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 30000)  # min/max_pixels win, as in HF's __init__
    assert qp.QwenProcessorConfig.from_hf({}, video=True).max_pixels == 28 * 28 * 768
    with pytest.raises(ConfigError, match="min_pixels=5000 is above max_pixels=4000"):
        qp.QwenProcessorConfig.from_hf({"min_pixels": 5000, "max_pixels": 4000})
    with pytest.raises(ConfigError, match="image_mean needs one value per RGB channel"):
        qp.QwenProcessorConfig.from_hf({"image_mean": [0.5, 0.5]})


@pytest.mark.parametrize("height, width, named", [
    (1, 1, "1x1 pixels, too small"),
    (0, 40, "40x0 pixels, too small"),
    (2, 500, "aspect ratio 250.0 is over the limit of 200"),
])
def test_image_errors(height, width, named):
    with pytest.raises(ImageError, match=named):
        qp.image_token_count(height, width)
    if height:
        with pytest.raises(ImageError, match=named):
            qp.process_image(_noise(height, width))


def _hf_video_processor():
    pytest.importorskip("torchvision", reason="transformers' Qwen2-VL video processor needs torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor()


@pytest.mark.parametrize("n_frames, size", [(5, (90, 130)), (4, (500, 333)), (1, (64, 64))])
def test_process_video_equals_the_hf_video_processor(n_frames, size):
    hf = _hf_video_processor()
    frames = [_noise(*size, seed=i) for i in range(n_frames)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
    got = qp.process_video(frames)
    assert torch.equal(got.grid_thw, expected["video_grid_thw"])  # 5 frames -> padded to 6: t = 3
    assert torch.equal(got.pixel_values, expected["pixel_values_videos"])


def test_process_video_samples_by_fps_and_num_frames_as_hf():
    hf = _hf_video_processor()
    frames = [_noise(70, 100, seed=i) for i in range(20)]
    for sampling in ({"fps": 2}, {"num_frames": 7}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = hf(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False, do_sample_frames=True,
                          video_metadata=[{"fps": 5, "total_num_frames": 20}], return_metadata=True, **sampling)
        got = qp.process_video(frames, source_fps=5, **sampling)
        meta = expected["video_metadata"][0]
        assert got.frame_indices == list(meta.frames_indices)
        assert got.second_per_grid == 2 / meta.sampled_fps  # Qwen2_5_VLProcessor's second_per_grid_ts
        assert torch.equal(got.grid_thw, expected["video_grid_thw"])
        assert torch.equal(got.pixel_values, expected["pixel_values_videos"])


def test_sample_frame_indices_and_video_errors():
    assert qp.sample_frame_indices(20, 2, source_fps=5, fps=2) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert qp.sample_frame_indices(9, 2, num_frames=4) == [0, 2, 4, 6]
    # 3 frames -> 4 (last one repeated); 56x56 is raised to the video min_pixels (128 tokens): 336x336
    assert qp.process_video([_noise(56, 56)] * 3).grid_thw.tolist() == [[2, 24, 24]]
    with pytest.raises(ImageError, match="needs the video's own frame rate"):
        qp.process_video([_noise(56, 56)] * 4, fps=2)
    with pytest.raises(ImageError, match="cannot sample 10 frames from a video of 4"):
        qp.process_video([_noise(56, 56)] * 4, num_frames=10)
    with pytest.raises(ImageError, match="frames differ in size"):
        qp.process_video([_noise(56, 56), _noise(56, 60)])
    with pytest.raises(ImageError, match="at least one frame"):
        qp.process_video([])


# ----------------------------------------------------------------------------- M-RoPE positions

IMG, VID, START, END = 151655, 151656, 151652, 151653  # Qwen2-VL's special token ids


def _hf_rope_index(kind: str, ids, image_grid=None, video_grid=None, second_per_grid_ts=None):
    """transformers' get_rope_index on one prompt, with the token types its processor would give."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    model = {"qwen2_vl": Qwen2VLModel, "qwen2_5_vl": Qwen2_5_VLModel, "qwen3_vl": Qwen3VLModel}[kind]
    # the method reads only these two attributes of the model: no weights needed
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=3)),
        get_vision_position_ids=lambda *a, **k: model.get_vision_position_ids(None, *a, **k))
    input_ids = torch.tensor([ids])
    types_ = ((input_ids == IMG).int() + 2 * (input_ids == VID).int())
    extra = {"second_per_grid_ts": second_per_grid_ts} if kind == "qwen2_5_vl" else {}
    positions, delta = model.get_rope_index(fake, input_ids, types_, image_grid_thw=image_grid,
                                            video_grid_thw=None if video_grid is None else video_grid.clone(),
                                            **extra)
    return positions[:, 0], int(delta)


def _vision(grid, token=IMG, kind="qwen2_vl"):
    t, h, w = grid
    if token == VID and kind == "qwen3_vl":  # Qwen3VLProcessor: "<t seconds>" text before each frame
        return [tok for _ in range(t) for tok in [20, 21, START] + [VID] * (h * w // 4) + [END]]
    return [START] + [token] * (t * h * w // 4) + [END]


def _prompts(kind="qwen2_vl"):
    g1, g2, v = [1, 4, 6], [1, 8, 4], [3, 4, 4]
    text = list(range(10, 17))
    yield "text only", text, None, None
    yield "one image", text[:3] + _vision(g1) + text, [g1], None
    yield "two images", text[:2] + _vision(g1) + text[:3] + _vision(g2) + text[:4], [g1, g2], None
    yield "image, text, video", text[:2] + _vision(g2) + text + _vision(v, VID, kind) + text[:2], [g2], [v]
    yield "a long video", text[:2] + _vision([8, 2, 2], VID, kind) + text[:3], None, [[8, 2, 2]]
    turn = lambda g: [1, 2, 3] + _vision(g) + [4, 5] + [6, 7, 8]  # noqa: E731  user + image, reply
    yield "multi-turn", turn(g1) + turn(g2) + turn(g1) + [9, 9], [g1, g2, g1], None


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", [p[0] for p in _prompts()])
def test_rope_index_matches_transformers(kind, name):
    _, ids, images, videos = next(p for p in _prompts(kind) if p[0] == name)
    image_grid = None if images is None else torch.tensor(images)
    video_grid = None if videos is None else torch.tensor(videos)
    seconds = None if videos is None else torch.tensor([0.7] * len(videos))  # 2.5: 3 tok/s * 0.7 s
    expected, expected_delta = _hf_rope_index(kind, ids, image_grid, video_grid, seconds)
    positions, delta = rope_index(ids, image_grid, video_grid, spatial_merge_size=2, image_token_id=IMG,
                                  video_token_id=VID, kind=kind, second_per_grid_ts=seconds, tokens_per_second=3)
    assert positions.dtype == torch.long and positions.shape == (3, len(ids))
    assert torch.equal(positions, expected) and delta == expected_delta
    # decoding continues as HF's cached rope_deltas do: position T + i + delta in all three rows
    assert decode_positions(len(ids), delta, 3).tolist() == [len(ids) + i + expected_delta for i in range(3)]


def test_rope_index_2_5_default_time_spacing_matches_transformers():
    ids = [1, 2] + _vision([4, 2, 4], VID) + [3]
    expected, expected_delta = _hf_rope_index("qwen2_5_vl", ids, video_grid=torch.tensor([[4, 2, 4]]))
    positions, delta = rope_index(ids, None, [[4, 2, 4]], spatial_merge_size=2, image_token_id=IMG,
                                  video_token_id=VID, kind="qwen2_5_vl", tokens_per_second=3)
    assert torch.equal(positions, expected) and delta == expected_delta
    assert positions[0, 3:11:2].tolist() == [3, 6, 9, 12]  # time steps 3 apart (3 tok/s * 1 s)


def test_rope_index_text_after_an_image_continues_past_it():
    positions, delta = rope_index([7, 7] + [IMG] * 6 + [7], [[1, 4, 6]], spatial_merge_size=2,
                                  image_token_id=IMG, video_token_id=VID)
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    assert positions[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3] and positions[2, 2:8].tolist() == [2, 3, 4] * 2
    assert positions[:, 8].tolist() == [5, 5, 5] and delta == 6 - 9


def test_rope_index_errors():
    common = dict(spatial_merge_size=2, image_token_id=IMG, video_token_id=VID)
    with pytest.raises(PromptError, match=r"grid \[1, 4, 6\] needs 6 placeholder tokens but its run in the "
                                          r"prompt has 5"):
        rope_index([1] + [IMG] * 5, [[1, 4, 6]], **common)
    with pytest.raises(PromptError, match="more image placeholder tokens than its 1 image grid"):
        rope_index([1] + [IMG] * 12, [[1, 4, 6]], **common)
    with pytest.raises(PromptError, match="2 image grid\\(s\\) given but the prompt's placeholder tokens account for 1"):
        rope_index([1] + [IMG] * 6, [[1, 4, 6], [1, 2, 2]], **common)
    with pytest.raises(PromptError, match="video placeholder tokens than its 0 video grid"):
        rope_index([1, VID], None, **common)
    with pytest.raises(ImageError, match="multiples of spatial_merge_size=2"):
        rope_index([1] + [IMG] * 6, [[1, 3, 8]], **common)
    with pytest.raises(PromptError, match="second_per_grid_ts has 2 values for 1 videos"):
        rope_index([1] + [VID] * 4, None, [[1, 4, 4]], kind="qwen2_5_vl", second_per_grid_ts=[1.0, 2.0], **common)


def test_adjacent_images_with_nothing_between_get_a_grid_each():
    positions, _ = rope_index([1] + [IMG] * 10, [[1, 4, 6], [1, 4, 4]], spatial_merge_size=2,
                              image_token_id=IMG, video_token_id=VID)
    assert positions[:, 7:].tolist() == [[4, 4, 4, 4], [4, 4, 5, 5], [4, 5, 4, 5]]  # second starts at 1 + 3


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_cos_sin_rotates_q_and_k_as_transformers(kind):
    if kind == "qwen3_vl":
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig as Config
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Rotary
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
        section = [6, 5, 5]
    else:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig as Config
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding as Rotary
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb
        section = [4, 6, 6]
    head_dim = 32
    config = Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    rotary = Rotary(config)
    ids = [3, 4] + _vision([1, 4, 6]) + [5] + _vision([2, 4, 4], VID) + [6, 7]
    positions, _ = rope_index(ids, [[1, 4, 6]], [[2, 4, 4]], spatial_merge_size=2, image_token_id=IMG,
                              video_token_id=VID, kind=kind)
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, len(ids), head_dim), torch.randn(1, 1, len(ids), head_dim)
    cos_hf, sin_hf = rotary(q, positions[:, None, :])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = mrope_cos_sin(positions, rotary.inv_freq, mrope_section({"rope_parameters": config.rope_parameters},
                                                                       head_dim, kind), interleaved=kind == "qwen3_vl")
    assert cos.shape == (len(ids), head_dim)
    from foveal.models.text import rotate_half

    q_ours, k_ours = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    assert (q_ours - q_hf).abs().max().item() < 1e-6 and (k_ours - k_hf).abs().max().item() < 1e-6
    # decode: one scalar position broadcast to the three rows
    step = torch.tensor([len(ids) + 5])
    cos_hf, sin_hf = rotary(q[..., :1, :], step.view(1, 1, 1).expand(3, 1, 1))
    cos, sin = mrope_cos_sin(step, rotary.inv_freq, section, interleaved=kind == "qwen3_vl")
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=1e-6)


def test_mrope_cos_sin_rejects_a_section_that_does_not_fit():
    with pytest.raises(ConfigError, match=r"mrope_section \[4, 6, 5\] sums to 15, not the 16"):
        mrope_cos_sin(torch.zeros(3, 2, dtype=torch.long), torch.ones(16), [4, 6, 5])
