"""Qwen-VL family parts (config, vision towers, processor, M-RoPE positions) against transformers.

Each parity test builds the transformers reference from a tiny config with seeded random weights in
float32 and compares outputs; each error test checks the typed error and what its message names.
"""

from __future__ import annotations

import pytest
import torch

from foveal.errors import ConfigError, ImageError
from foveal.models.families.qwen2_vl.config import QwenVisionConfig, mrope_section
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
