"""Llama 3.2 Vision (Mllama): tiled vision encoders, a Llama decoder with gated cross-attention layers.
The family contract (models/interface.py) is in family.py; Ollama's single-file `mllama` GGUF (its
llama3.2-vision) is read and written by gguf.py."""

from .family import NAME, build, complete, config, config_to_hf, describe, hf_name, plan_complete, plan_vision, processor  # noqa: F401
