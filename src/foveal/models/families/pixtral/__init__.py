"""Pixtral-12B and Mistral 3 (Mistral Small 3.1 / 3.2): config, Pixtral ViT, projectors, processor.
The family contract (models/interface.py) is in family.py."""

from .family import NAME, build, complete, config, config_to_hf, describe, hf_name, plan_complete, plan_vision, processor  # noqa: F401
