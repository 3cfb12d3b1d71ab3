"""Qwen2-VL / Qwen2.5-VL (and Qwen3-VL's vision side): config, vision tower, processor, M-RoPE positions.
The family contract (models/interface.py) is in family.py."""

from .family import NAME, build, complete, config, config_to_hf, describe, hf_name, plan_complete, plan_vision, processor  # noqa: F401
