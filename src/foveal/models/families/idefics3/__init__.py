"""Idefics3 and SmolVLM (images): config, SigLIP tower with the pixel-shuffle connector, tiling processor.
The family contract (models/interface.py) is in family.py."""

from .family import NAME, build, complete, config, config_to_hf, describe, hf_name, plan_complete, plan_vision, processor  # noqa: F401
