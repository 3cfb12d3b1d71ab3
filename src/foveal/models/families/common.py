"""What several family modules do the same way: checkpoint files they read, the config they write back."""

from __future__ import annotations

import json

from ...errors import ConfigError
from ..interface import Checkpoint


def config_as_loaded(raw: dict, model: str) -> dict:
    """config.json for a checkpoint foveal writes of a model it does not reshape (a quantized one): the one it
    was read from. model: how the error names it ("a Qwen2-VL")."""
    if not raw:
        raise ConfigError(f"writing {model} checkpoint needs the config.json it was loaded from")
    return dict(raw)


def processor_settings(ck: Checkpoint) -> dict:
    """The checkpoint folder's processor_config.json ({} where there is none, or the model is a GGUF file)."""
    folder = ck.path if ck.path.is_dir() else None
    if folder is None or not (folder / "processor_config.json").exists():
        return {}
    try:
        d = json.loads((folder / "processor_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{folder / 'processor_config.json'} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}
