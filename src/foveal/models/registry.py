"""Which family module runs a checkpoint: HF `model_type` / `architectures[0]` -> module, imported lazily.

Design decisions (after vLLM's model registry and mlx-vlm's `get_model_and_args`):
- One line per name; the module is imported only when a checkpoint names it.
- `model_type` decides first, as transformers' Auto classes do, with the vision tower's model_type as the
  tie-breaker where one HF class holds towers of several families (`VISION_MODEL_TYPES`); `architectures[0]` is the
  fallback for a config without a known model_type. The original LLaVA repo's configs (a
  plain LM config plus `mm_*` keys) are recognised by `mm_vision_tower`.
- An unknown model is refused with the list of what is supported.
- A family may own its GGUF mapping (`families/<name>/gguf.py`: llama.cpp's tensor names and
  metadata for it, both directions); `GGUF_ARCHITECTURES` says which, by llama.cpp's text
  architecture. LLaVA and plain llama / qwen2 LMs stay in weights/gguf_read.py / gguf_write.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError

MODEL_TYPES = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_llama": "llava",
    "llava_mistral": "llava",
    "llava_qwen": "llava",
    "llava_qwen2": "llava",
    "llava_onevision": "llava_onevision",
    "llama": "text_only",
    "mistral": "text_only",
    "qwen2": "text_only",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "qwen3_vl": "qwen3_vl",
    "internvl": "internvl",
    "mistral3": "pixtral",
    "mllama": "mllama",
    "gemma3": "gemma3",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
}
# (model_type, vision_config.model_type) -> family, before MODEL_TYPES: one HF class holding towers that
# different families run (Pixtral-12B is a LlavaForConditionalGeneration with a pixtral vision_config)
VISION_MODEL_TYPES = {
    ("llava", "pixtral"): "pixtral",
}
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava",
    "LlavaLlamaForCausalLM": "llava",
    "LlavaMistralForCausalLM": "llava",
    "LlavaQwenForCausalLM": "llava",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "LlamaForCausalLM": "text_only",
    "MistralForCausalLM": "text_only",
    "Qwen2ForCausalLM": "text_only",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "InternVLForConditionalGeneration": "internvl",
    "Mistral3ForConditionalGeneration": "pixtral",
    "MllamaForConditionalGeneration": "mllama",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
}
# what the error lists: family -> the model types it reads
SUPPORTED = {
    "llava": "LLaVA-1.5 and LLaVA-NeXT (llava, llava_next; CLIP / SigLIP towers with llama / mistral / qwen2), "
             "the original LLaVA repo (llava_llama, llava_mistral, llava_qwen)",
    "llava_onevision": "LLaVA-OneVision, images (llava_onevision; SigLIP / CLIP towers with qwen2 / llama / mistral)",
    "text_only": "text-only llama, mistral, qwen2",
    "qwen2_vl": "Qwen2-VL and Qwen2.5-VL (qwen2_vl, qwen2_5_vl)",
    "qwen3_vl": "Qwen3-VL, images (qwen3_vl)",
    "internvl": "InternVL 2.5 / 3 as transformers ports it (internvl)",
    "pixtral": "Pixtral-12B (llava with a pixtral vision_config) and Mistral 3 (mistral3)",
    "mllama": "Llama 3.2 Vision (mllama)",
    "gemma3": "Gemma 3 with its SigLIP tower, images (gemma3)",
    "idefics3": "Idefics3 and SmolVLM, images (idefics3, smolvlm)",
}


# llama.cpp text architecture -> the family whose gguf.py reads and writes it
GGUF_ARCHITECTURES = {
    "qwen2vl": "qwen2_vl",
    "mllama": "mllama",          # Ollama's llama3.2-vision: one file, text and vision (families/mllama/gguf.py)
    "gemma3": "gemma3",
}
# GGUF architectures whose one file holds the vision tower too (no mmproj): a vision model when listed
GGUF_WITH_VISION = frozenset({"mllama"})


def family_name(raw: dict) -> str:
    """The family module's name for a parsed config.json."""
    if "mm_vision_tower" in raw:
        return "llava"
    model_type = raw.get("model_type")
    vision = raw.get("vision_config")
    vision_type = vision.get("model_type") if isinstance(vision, dict) else None
    if (model_type, vision_type) in VISION_MODEL_TYPES:
        return VISION_MODEL_TYPES[(model_type, vision_type)]
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    architectures = raw.get("architectures") or []
    if architectures and architectures[0] in ARCHITECTURES and model_type is None:
        return ARCHITECTURES[architectures[0]]
    raise UnsupportedModelError(
        f"model_type {model_type!r} (architectures {architectures}) is not supported; supported: "
        + "; ".join(SUPPORTED.values()))


def family(name: str) -> ModuleType:
    return importlib.import_module(f"foveal.models.families.{name}")


def family_for(raw: dict) -> ModuleType:
    """The family module for a parsed config.json (UnsupportedModelError names what is supported)."""
    return family(family_name(raw))


def gguf_family(arch: str) -> ModuleType | None:
    """The GGUF mapping of the family that owns llama.cpp architecture `arch` (None: the shared code's)."""
    name = GGUF_ARCHITECTURES.get(arch)
    return None if name is None else importlib.import_module(f"foveal.models.families.{name}.gguf")


def gguf_family_for(raw: dict) -> ModuleType | None:
    """The GGUF mapping of the family that runs this config.json, if that family owns one."""
    try:
        name = family_name(raw)
    except UnsupportedModelError:
        return None
    arch = next((a for a, n in GGUF_ARCHITECTURES.items() if n == name), None)
    return None if arch is None else gguf_family(arch)
