"""Qwen2-VL / Qwen2.5-VL (and Qwen3-VL's vision side): config, vision tower, processor, M-RoPE positions."""
