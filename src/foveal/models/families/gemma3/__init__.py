"""Gemma 3 (Gemma3ForConditionalGeneration): config, the Gemma 3 decoder, the pooled SigLIP projector, the
processor. The family contract (models/interface.py) is in family.py."""

from .family import NAME, build, complete, config, config_to_hf, describe, hf_name, plan_complete, plan_vision, processor  # noqa: F401
