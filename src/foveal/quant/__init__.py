"""Weight-only int8 / int4 quantization of the language model (see linear.py and quantize.py)."""

from __future__ import annotations

from .linear import MAX_FAST_ROWS, QUANTIZED, Int4Linear, Int8Linear, cpu_int4_available
from .quantize import (DEFAULT_GROUP, MODES, parse_quant, plan_modules, quantize_from_checkpoint, quantize_model,
                       quantized_modules, read_quant_config, save_quantized, set_fast_path, swap_to_quantized)


def before_load(model, raw_config: dict, dtype, quant) -> tuple[dict | None, tuple[str, int] | None]:
    """At load, on the meta model: validate `quant=`, and swap in the quantized modules a saved
    quantized checkpoint names, so that their buffers load by name. Returns (saved, requested)."""
    from ..errors import ConfigError
    requested = parse_quant(quant) if quant is not None else None
    saved = read_quant_config(raw_config)
    if saved and requested:
        raise ConfigError(f"quant={quant!r}: this checkpoint is already quantized ({saved.get('mode')}); "
                          f"load it without quant=")
    if saved:
        swap_to_quantized(model, saved, dtype)
    return saved, requested


def head_is_quantized(model) -> bool:
    return isinstance(model.lm_head, QUANTIZED)


def after_load(model, saved: dict | None, requested: tuple[str, int] | None) -> None:
    """Pack loaded quantized weights for the CPU kernels, or quantize a float model on the fly."""
    if saved:
        set_fast_path(model, True)
    elif requested:
        quantize_model(model, requested[0], requested[1])


__all__ = ["Int8Linear", "Int4Linear", "QUANTIZED", "MAX_FAST_ROWS", "DEFAULT_GROUP", "MODES", "quantize_model",
           "quantize_from_checkpoint", "plan_modules", "parse_quant", "set_fast_path", "quantized_modules", "save_quantized",
           "read_quant_config", "swap_to_quantized", "cpu_int4_available", "before_load", "after_load",
           "head_is_quantized"]
