"""Checkpoints that transformers loads but earlier foveal refused or crashed on (issue 30, loading)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import foveal
from foveal.errors import ConfigError
from tiny import build_llava, hf_model


def _rewrite(folder, edit_config=None, drop=()):
    if edit_config:
        d = json.loads((folder / "config.json").read_text())
        edit_config(d)
        (folder / "config.json").write_text(json.dumps(d))
    if drop:
        state = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in state.items() if k not in drop}, folder / "model.safetensors",
                  metadata={"format": "pt"})


def test_tie_flag_at_the_top_level_only_loads_tied_as_transformers_does(tmp_path):
    folder = build_llava(tmp_path / "m", tie=True)
    state = load_file(folder / "model.safetensors")
    heads = [k for k in state if k.endswith("lm_head.weight")]

    def top_only(d):
        d["tie_word_embeddings"] = True
        d["text_config"]["tie_word_embeddings"] = False
    _rewrite(folder, top_only, drop=heads)
    ref = hf_model(folder)
    assert ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()
    ours = foveal.load(str(folder), dtype="float32")
    assert ours.model.lm_head.weight is ours.model.language_model.embed_tokens.weight
    ids = [1, 5, 9, 30, 44]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    got = ours.engine.prompt_logits(ids, [False] * len(ids), None)
    assert (got - want).abs().max().item() <= 1e-4


def test_image_processor_that_crops_to_another_size_than_the_tower_is_refused_before_running(tmp_path):
    folder = build_llava(tmp_path / "m", image_size=32, patch=8)
    pre = json.loads((folder / "processor_config.json").read_text()) if (folder / "processor_config.json").exists() \
        else None
    path = folder / "preprocessor_config.json"
    if path.exists():
        d = json.loads(path.read_text())
        d["crop_size"] = {"height": 24, "width": 24}
        d["size"] = {"shortest_edge": 24}
        path.write_text(json.dumps(d))
    else:
        pre["image_processor"]["crop_size"] = {"height": 24, "width": 24}
        pre["image_processor"]["size"] = {"shortest_edge": 24}
        (folder / "processor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError) as info:
        foveal.load(str(folder))
    msg = str(info.value)
    assert "24x24" in msg and "32x32" in msg and "image_size" in msg and "processor" in msg
