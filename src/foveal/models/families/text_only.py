"""Plain causal LMs (llama, mistral, qwen2): the LLaVA model with no tower, prompts from the chat
template alone. An image given to one is refused by the prompt builder by name."""

from __future__ import annotations

from ... import config as C
from ..interface import Checkpoint
from . import llava

NAME = "text"


def config(raw: dict) -> C.VLMConfig:
    return C.config_from_hf(raw)


def complete(cfg: C.VLMConfig, ck: Checkpoint, vision_tower=None) -> None:
    return None


build = llava.build
hf_name = llava.hf_name
config_to_hf = llava.config_to_hf
plan_complete = llava.plan_complete
plan_vision = llava.plan_vision


def processor(cfg: C.VLMConfig, ck: Checkpoint, image_mode: str | None = None) -> llava.LlavaProcessor:
    return llava.processor(cfg, ck, image_mode)


def describe(cfg: C.VLMConfig, processor=None) -> dict:
    return llava.describe(cfg, processor) | {"family": NAME}
