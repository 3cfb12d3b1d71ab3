"""Config parsing: our HF-default tables against transformers' config classes, sparse real configs,
RoPE forms, the original LLaVA layout and the errors for what foveal does not run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from foveal.config import (LLAVA_DEFAULTS, LLAVA_VISION_DEFAULT, TEXT_DEFAULTS, VISION_DEFAULTS, RopeConfig,
                           attach_vision, config_from_hf, load_config_file, rope_config_from_hf,
                           text_config_from_hf, vision_config_from_hf)
from foveal.errors import ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

# llava-hf/llava-1.5-7b-hf's config.json as published: sparse, LM and tower mostly from class defaults.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

# liuhaotian/llava-v1.5-7b's config.json (original LLaVA repo): a flat Llama config plus mm_* keys.
ORIGINAL_LLAVA_15_7B = {
    "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
    "architectures": ["LlavaLlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_aspect_ratio": "pad",
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_length": 4096,
    "max_position_embeddings": 4096,
    "mm_hidden_size": 1024,
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "model_type": "llava_llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0",
    "tune_mm_mlp_adapter": False,
    "use_cache": True,
    "use_mm_proj": True,
    "vocab_size": 32000,
}


def _hf_rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None)
    return params["rope_theta"] if params else hf_cfg.rope_theta


def _hf_q_o_bias(text_cls, config_cls) -> tuple[bool, bool, bool]:
    """Whether a tiny instance of the HF model has bias on q_proj, o_proj and the MLP."""
    cfg = config_cls(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=8)
    layer = text_cls(cfg).layers[0]
    return (layer.self_attn.q_proj.bias is not None, layer.self_attn.o_proj.bias is not None,
            layer.mlp.gate_proj.bias is not None)


# ---- our default tables are transformers' class defaults -----------------------------------
@pytest.mark.parametrize("model_type,cls_name", [("clip_vision_model", "CLIPVisionConfig"),
                                                  ("siglip_vision_model", "SiglipVisionConfig")])
def test_vision_defaults_equal_transformers(model_type, cls_name):
    hf = getattr(transformers, cls_name)()
    assert hf.model_type == model_type
    for key, ours in VISION_DEFAULTS[model_type].items():
        assert getattr(hf, key) == ours, f"{cls_name}.{key}: HF {getattr(hf, key)!r}, ours {ours!r}"


@pytest.mark.parametrize("model_type,cls_name,model_name", [("llama", "LlamaConfig", "LlamaModel"),
                                                             ("mistral", "MistralConfig", "MistralModel"),
                                                             ("qwen2", "Qwen2Config", "Qwen2Model")])
def test_text_defaults_equal_transformers(model_type, cls_name, model_name):
    config_cls = getattr(transformers, cls_name)
    hf = config_cls()
    table = TEXT_DEFAULTS[model_type]
    for key, ours in table.items():
        if key == "rope_theta":
            assert _hf_rope_theta(hf) == ours, f"{cls_name} rope theta"
        elif key == "num_key_value_heads" and ours is None:
            assert hf.num_key_value_heads == hf.num_attention_heads     # None means "= heads", as in HF
        elif key in ("attention_bias", "mlp_bias") and not hasattr(hf, key):
            continue    # Mistral / Qwen2 hard-code these in the model: checked on a real instance below
        else:
            assert getattr(hf, key) == ours, f"{cls_name}.{key}: HF {getattr(hf, key)!r}, ours {ours!r}"
    # What the model classes actually build: q/k/v bias (Qwen2 only), never on o_proj, no MLP bias.
    q_bias, o_bias, mlp_bias = _hf_q_o_bias(getattr(transformers, model_name), config_cls)
    assert q_bias == table["attention_bias"]
    assert o_bias is False
    assert mlp_bias == table["mlp_bias"]
    # Our parser of an empty config of this type gives the same numbers as HF's class.
    ours = text_config_from_hf({"model_type": model_type})
    assert ours.num_key_value_heads == hf.num_key_value_heads
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.rope == RopeConfig(theta=_hf_rope_theta(hf))
    assert ours.sliding_window == getattr(hf, "sliding_window", None)


def test_llava_defaults_equal_transformers():
    hf = transformers.LlavaConfig()
    for key, ours in LLAVA_DEFAULTS.items():
        assert getattr(hf, key) == ours, f"LlavaConfig.{key}: HF {getattr(hf, key)!r}, ours {ours!r}"
    for key, ours in LLAVA_VISION_DEFAULT.items():
        assert getattr(hf.vision_config, key) == ours, f"LlavaConfig().vision_config.{key}"
    assert hf.text_config.model_type == "llama"
    # An empty llava config parses to what LlavaConfig() holds.
    cfg = config_from_hf({"model_type": "llava"})
    assert cfg.vision.hidden_size == hf.vision_config.hidden_size == 1024
    assert cfg.vision.hidden_act == hf.vision_config.hidden_act == "quick_gelu"
    assert cfg.text.hidden_size == hf.text_config.hidden_size
    assert cfg.image_token_id == hf.image_token_index
    assert cfg.image_tokens_per_image == hf.image_seq_length == 576


# ---- a sparse real config -------------------------------------------------------------------
def test_llava_15_7b_sparse_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAVA_15_7B))
    cfg = config_from_hf(load_config_file(path))
    v, t, p = cfg.vision, cfg.text, cfg.projector
    assert cfg.layout == "llava-hf" and cfg.architecture == "LlavaForConditionalGeneration"
    # vision: given keys kept, absent ones from CLIPVisionConfig's defaults
    assert (v.model_type, v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads,
            v.image_size, v.patch_size) == ("clip_vision_model", 1024, 4096, 24, 16, 336, 14)
    assert v.hidden_act == "quick_gelu" and v.layer_norm_eps == 1e-5 and v.num_channels == 3
    # language model: LlamaConfig defaults except what the file sets
    assert (t.model_type, t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers) == \
        ("llama", 32064, 4096, 11008, 32)
    assert t.num_attention_heads == 32 and t.num_key_value_heads == 32 and t.head_dim == 128
    assert t.rms_norm_eps == 1e-5                   # set explicitly by this checkpoint, not the 1e-6 default
    assert t.max_position_embeddings == 4096
    assert t.rope == RopeConfig(theta=10000.0, kind="default")
    assert t.attention_bias is False and t.mlp_bias is False and t.tie_word_embeddings is False
    assert t.bos_token_id == 1 and t.eos_token_id == [2]
    # projector and merge
    assert (p.kind, p.in_features, p.out_features, p.hidden_act, p.bias) == ("mlp2x_gelu", 1024, 4096, "gelu", True)
    assert cfg.image_token_id == 32000
    assert cfg.feature_layers == [-2] and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_tokens_per_image == 576
    # transformers reads the same file to the same numbers
    hf = transformers.LlavaConfig.from_dict(copy.deepcopy(LLAVA_15_7B))
    assert hf.text_config.num_key_value_heads == t.num_key_value_heads
    assert hf.text_config.rms_norm_eps == t.rms_norm_eps
    assert _hf_rope_theta(hf.text_config) == t.rope.theta
    assert hf.vision_config.hidden_act == v.hidden_act and hf.vision_config.layer_norm_eps == v.layer_norm_eps


def test_qwen2_and_siglip_sparse_config():
    cfg = config_from_hf({
        "model_type": "llava", "image_token_index": 151646, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "text_config": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                        "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 152000},
    })
    assert cfg.vision.hidden_act == "gelu_pytorch_tanh" and cfg.vision.layer_norm_eps == 1e-6
    assert cfg.text.attention_bias is True and cfg.text.head_dim == 64 and cfg.text.num_key_value_heads == 2
    assert cfg.text.rope.theta == 1e6 and cfg.text.tie_word_embeddings is True
    assert cfg.text.max_position_embeddings == 32768 and cfg.text.rms_norm_eps == 1e-6
    assert cfg.image_tokens_per_image == (384 // 14) ** 2 == 729      # SigLIP has no CLS; "full" keeps all


def test_explicit_head_dim_and_list_feature_layers():
    cfg = config_from_hf({"model_type": "llava", "vision_feature_layer": [-2, -5, 3],
                          "vision_config": {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
                                            "image_size": 32, "patch_size": 8},
                          "text_config": {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
                                          "num_key_value_heads": 1, "head_dim": 32}})
    assert cfg.text.head_dim == 32 and cfg.text.num_key_value_heads == 1
    assert cfg.text.sliding_window == 4096 and cfg.text.max_position_embeddings == 131072
    assert cfg.feature_layers == [-2, -5, 3]
    assert cfg.projector.in_features == 64 * 3


# ---- RoPE: 4.x and v5 forms give one RopeConfig ----------------------------------------------
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("v4,v5,expected", [
    ({"rope_theta": 10000.0}, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     RopeConfig(theta=10000.0)),
    ({"rope_theta": 1e6, "rope_scaling": None}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
     RopeConfig(theta=1e6)),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     RopeConfig(theta=10000.0, kind="linear", factor=2.0)),
    ({"rope_theta": 5e5, "rope_scaling": {"type": "dynamic", "factor": 4.0}},
     {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5e5}},
     RopeConfig(theta=5e5, kind="dynamic", factor=4.0)),
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}},
     {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING}},
     RopeConfig(theta=5e5, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)),
    # v5 parameters without a theta take the top-level one, as transformers does
    ({"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     {"rope_theta": 1e6, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     RopeConfig(theta=1e6, kind="linear", factor=2.0)),
], ids=["default", "theta-only", "linear", "dynamic", "llama3", "theta-outside-parameters"])
def test_rope_forms_agree(v4, v5, expected):
    assert rope_config_from_hf(v4) == expected
    assert rope_config_from_hf(v5) == expected
    full4 = text_config_from_hf({"model_type": "llama", "max_position_embeddings": 131072, **v4})
    full5 = text_config_from_hf({"model_type": "llama", "max_position_embeddings": 131072, **v5})
    assert full4.rope == full5.rope == expected
    # transformers standardises the 4.x form to the same parameters
    hf = transformers.LlamaConfig.from_dict({"max_position_embeddings": 131072, **copy.deepcopy(v4)})
    params = hf.rope_parameters
    assert params["rope_theta"] == expected.theta
    assert params.get("rope_type", "default") == expected.kind
    assert float(params.get("factor", 1.0)) == expected.factor


# ---- what is not supported: typed errors that name the thing and the alternatives -------------
def _error(exc_type, d):
    with pytest.raises(exc_type) as info:
        config_from_hf(d)
    return str(info.value)


def test_unknown_model_type():
    msg = _error(UnsupportedModelError, {"model_type": "gpt2", "n_embd": 768})
    assert "'gpt2'" in msg and "llava" in msg
    for name in ("llama", "mistral", "qwen2"):
        assert name in msg
    msg = _error(UnsupportedModelError, {"vocab_size": 10})             # no model_type at all
    assert "None" in msg and "supported" in msg


def test_unsupported_text_model_inside_llava():
    msg = _error(UnsupportedModelError, {"model_type": "llava", "text_config": {"model_type": "gemma"}})
    assert "'gemma'" in msg and "llama, mistral, qwen2" in msg


def test_unsupported_vision_tower():
    msg = _error(UnsupportedModelError, {"model_type": "llava", "vision_config": {"model_type": "dinov2"}})
    assert "'dinov2'" in msg and "clip_vision_model" in msg and "siglip_vision_model" in msg


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0}, {"type": "longrope", "factor": 4.0}])
def test_unsupported_rope_type(scaling):
    kind = scaling.get("rope_type") or scaling["type"]
    msg = _error(UnsupportedModelError, {"model_type": "llama", "rope_scaling": scaling})
    assert repr(kind) in msg
    for name in ("linear", "dynamic", "llama3"):
        assert name in msg
    with pytest.raises(UnsupportedModelError, match=kind):
        rope_config_from_hf({"rope_parameters": {**scaling, "rope_theta": 1e4}})


def test_bad_rope_values():
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        rope_config_from_hf({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="factor"):
        rope_config_from_hf({"rope_scaling": {"rope_type": "linear", "factor": -2.0}})


@pytest.mark.parametrize("layer", [25, -26, 100])
def test_feature_layer_outside_tower(layer):
    msg = _error(ConfigError, dict(LLAVA_15_7B, vision_feature_layer=layer))
    assert str(layer) in msg and "25 hidden states" in msg
    msg = _error(ConfigError, dict(LLAVA_15_7B, vision_feature_layer=[-2, layer]))
    assert str(layer) in msg


def test_feature_layer_edges_accepted():
    for layer in (24, -25, 0, -1):
        assert config_from_hf(dict(LLAVA_15_7B, vision_feature_layer=layer)).feature_layers == [layer]


def test_bad_select_strategy():
    msg = _error(ConfigError, dict(LLAVA_15_7B, vision_feature_select_strategy="cls"))
    assert "'cls'" in msg and "default" in msg and "full" in msg


def test_bad_shapes_and_activation():
    with pytest.raises(ConfigError, match="not divisible"):
        vision_config_from_hf({"hidden_size": 100, "num_attention_heads": 16})
    with pytest.raises(ConfigError, match="patch_size"):
        vision_config_from_hf({"image_size": 10, "patch_size": 14})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        text_config_from_hf({"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 5})
    with pytest.raises(UnsupportedModelError, match="gelu"):
        text_config_from_hf({"model_type": "llama", "hidden_act": "gelu"})


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config_file(tmp_path / "config.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="JSON object"):
        config_from_hf([1, 2, 3])


# ---- the original LLaVA layout ----------------------------------------------------------------
def test_original_llava_config():
    cfg = config_from_hf(copy.deepcopy(ORIGINAL_LLAVA_15_7B))
    assert cfg.layout == "original" and cfg.architecture == "LlavaLlamaForCausalLM"
    assert cfg.vision is None and cfg.image_token_id is None
    assert cfg.vision_tower_path == "openai/clip-vit-large-patch14-336"
    assert cfg.feature_layers == [-2] and cfg.vision_feature_select_strategy == "default"
    p = cfg.projector
    assert (p.kind, p.in_features, p.out_features, p.hidden_act) == ("mlp2x_gelu", 1024, 4096, "gelu")
    t = cfg.text
    assert (t.model_type, t.vocab_size, t.hidden_size, t.num_hidden_layers, t.rms_norm_eps) == \
        ("llama", 32000, 4096, 32, 1e-5)
    assert t.rope == RopeConfig(theta=10000.0)
    # the tower's own config (openai/clip-vit-large-patch14-336 is a full CLIPConfig) fills the vision part
    clip = transformers.CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096,
                                                      num_hidden_layers=24, num_attention_heads=16,
                                                      image_size=336, patch_size=14)).to_dict()
    attach_vision(cfg, clip)
    assert cfg.vision.model_type == "clip_vision_model" and cfg.vision.hidden_act == "quick_gelu"
    assert cfg.image_tokens_per_image == 576


def test_original_llava_variants():
    base = copy.deepcopy(ORIGINAL_LLAVA_15_7B)
    linear = config_from_hf({k: v for k, v in base.items() if k != "mm_projector_type"})
    assert linear.projector.kind == "linear"                       # the original repo's default
    full = config_from_hf(dict(base, mm_vision_select_feature="cls_patch"))
    assert full.vision_feature_select_strategy == "full"
    with pytest.raises(UnsupportedModelError, match="'mlp3x_gelu'") as info:
        config_from_hf(dict(base, mm_projector_type="mlp3x_gelu"))
    assert "mlp2x_gelu" in str(info.value) and "linear" in str(info.value)
    with pytest.raises(ConfigError, match="mm_vision_tower"):
        config_from_hf(dict({k: v for k, v in base.items() if k != "mm_vision_tower"}))
    # a tower deeper than the select layer allows is refused once the tower is known
    cfg = config_from_hf(dict(base, mm_vision_select_layer=-30))
    with pytest.raises(ConfigError, match="-30"):
        attach_vision(cfg, {"model_type": "clip_vision_model", "num_hidden_layers": 24})


def test_text_only_model():
    cfg = config_from_hf({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128})
    assert cfg.layout == "text" and cfg.vision is None and cfg.image_tokens_per_image == 0
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.text.attention_bias is True


def test_roundtrip_through_our_writer():
    """What foveal writes (weights/save.py) reads back to the same config, and transformers agrees."""
    from foveal.bundled import random_config
    from foveal.weights.save import config_to_hf
    cfg = random_config()
    cfg.text.rope = RopeConfig(theta=5e5, kind="llama3", factor=8.0, original_max_position_embeddings=1024)
    written = config_to_hf(cfg)
    again = config_from_hf(json.loads(json.dumps(written)))
    assert again.to_dict() == cfg.to_dict()
    hf = transformers.LlavaConfig.from_dict(json.loads(json.dumps(written)))
    assert hf.text_config.rope_parameters["rope_type"] == "llama3"
    assert torch.tensor(hf.text_config.rope_parameters["rope_theta"]).item() == 5e5
