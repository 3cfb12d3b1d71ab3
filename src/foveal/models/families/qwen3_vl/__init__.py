"""Qwen3-VL: Qwen2-VL's processor and positions, a ViT with learned position embeddings and DeepStack,
a Qwen3 decoder with interleaved M-RoPE. The family contract (models/interface.py) is in family.py."""

from .family import NAME, build, complete, config, config_to_hf, describe, hf_name, plan_complete, plan_vision, processor  # noqa: F401
