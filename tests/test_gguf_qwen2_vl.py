"""Qwen2-VL and Qwen2.5-VL as GGUF: a `qwen2vl` text model and a qwen2vl_merger / qwen2.5vl_merger
mmproj, written as llama.cpp's converter writes them and read back by foveal.

Tiny random checkpoints saved by save_pretrained (tests/tiny.py); the reference is foveal's own
load of the HF folder, which tests/test_qwen2_vl.py holds to transformers within 1e-4.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

import foveal
from foveal.cli import main as cli_main
from foveal.errors import UnsupportedModelError, WeightsError
from foveal.weights.gguf import GGUFFile, read_hf_folder, write_gguf
from tiny import QWEN_VL_PIXELS, build_qwen2_vl
from tiny import ask as _ask, random_image as _image

KINDS = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = build_qwen2_vl(root / "hf", kind=request.param)
    f32 = write_gguf(read_hf_folder(folder), root / "f32", type="f32")
    assert cli_main(["export", str(folder), "--gguf", str(root / "q8"), "--type", "q8_0"]) == 0
    q8 = (next((root / "q8").glob("*-Q8_0.gguf")), next((root / "q8").glob("mmproj-*.gguf")))
    return request.param, folder, f32, q8, foveal.load(str(folder), dtype="float32")


@pytest.mark.parametrize("size", [(100, 60), (57, 333), (700, 500)])
def test_f32_export_gives_the_folders_logits(exported, size):
    kind, _, (model, mmproj), _, ref = exported
    ours = foveal.load(str(model), mmproj=str(mmproj), dtype="float32")
    assert ours.describe()["family"] == "qwen2_vl" and ours.describe()["layout"] == kind
    messages = _ask("What is in this image?", _image(size))
    ids, logits = ours.prompt_logits(messages)
    ref_ids, ref_logits = ref.prompt_logits(messages)
    assert ids == ref_ids                       # chat template and tokenizer from the GGUF metadata
    diff = (logits - ref_logits).abs().max().item()
    print(f"{kind} {size}: max |logit diff| F32 GGUF vs HF folder = {diff:.3g}")
    assert diff <= 1e-3
    # the pixel budget came back from clip.vision.image_min/max_pixels
    assert ours.describe()["min_pixels"] == QWEN_VL_PIXELS["min_pixels"]
    assert ours.describe()["max_pixels"] == QWEN_VL_PIXELS["max_pixels"]


def test_f32_export_answers_like_the_folder_over_two_images(exported):
    _, _, (model, mmproj), _, ref = exported
    ours = foveal.load(str(model), mmproj=str(mmproj), dtype="float32")
    messages = _ask("Compare these.", _image((100, 60), 1), _image((64, 200), 2))
    assert ours.generate(messages, max_tokens=12, temperature=0.0).token_ids == \
        ref.generate(messages, max_tokens=12, temperature=0.0).token_ids


def test_written_metadata_and_names_are_llama_cpps(exported):
    kind, folder, (model, mmproj), _, _ = exported
    hf = load_file(folder / "model.safetensors")
    with GGUFFile(model) as text:
        meta = text.metadata
        assert meta["general.architecture"] == "qwen2vl"
        assert meta["qwen2vl.rope.dimension_sections"].tolist() == [2, 3, 3, 0]
        assert meta["qwen2vl.rope.freq_base"] == 1e6 and meta["qwen2vl.attention.head_count_kv"] == 2
        assert meta["tokenizer.ggml.model"] == "gpt2" and "<|image_pad|>" in meta["tokenizer.ggml.tokens"]
        assert "<|vision_start|>" in meta["tokenizer.chat_template"]
        names = set(text.tensors)
        assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.bias",
                "blk.1.attn_k.bias", "blk.1.attn_v.bias", "blk.1.ffn_gate.weight"} <= names
        assert not any("visual" in n or n.startswith("v.") for n in names)
        assert "blk.0.attn_output.bias" not in names
    with GGUFFile(mmproj) as proj:
        meta, names = proj.metadata, set(proj.tensors)
        assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
        assert meta["clip.projector_type"] == {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}[kind]
        assert meta["clip.has_vision_encoder"] is True and meta["clip.vision.projection_dim"] == 64
        assert meta["clip.vision.embedding_length"] == 32 and meta["clip.vision.attention.head_count"] == 4
        assert meta["clip.vision.patch_size"] == 14 and meta["clip.vision.spatial_merge_size"] == 2
        assert meta["clip.vision.block_count"] == (2 if kind == "qwen2_vl" else 3)
        assert meta["clip.use_silu"] is (kind == "qwen2_5_vl") and meta["clip.use_gelu"] is False
        if kind == "qwen2_5_vl":     # fullatt_block_indexes [1]: every 2nd block attends fully
            assert meta["clip.vision.n_wa_pattern"] == 2 and meta["clip.vision.window_size"] == 56
        else:
            assert "clip.vision.n_wa_pattern" not in meta
        # the Conv3d kernel (W, C, 2, P, P) as two Conv2d kernels, one per frame
        patch = hf["visual.patch_embed.proj.weight"]
        for frame, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
            assert proj.tensors[name].shape == (32, 3, 14, 14) and proj.tensors[name].qtype == Q.F32
            assert torch.equal(proj.tensor(name, torch.float32), patch[:, :, frame])
        qkv = hf["visual.blocks.0.attn.qkv.weight"]
        for third, key in enumerate(("attn_q", "attn_k", "attn_v")):
            assert torch.equal(proj.tensor(f"v.blk.0.{key}.weight", torch.float32), qkv[32 * third:32 * (third + 1)])
        assert torch.equal(proj.tensor("v.post_ln.weight", torch.float32), hf["visual.merger.ln_q.weight"])
        assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.blk.0.ln1.weight",
                "v.blk.0.attn_out.bias", "v.blk.0.ffn_up.weight", "v.blk.0.ffn_down.bias"} <= names
        if kind == "qwen2_5_vl":     # RMSNorms, a gated MLP
            assert "v.blk.0.ffn_gate.weight" in names and "v.blk.0.ln1.bias" not in names
            assert "v.post_ln.bias" not in names
        else:
            assert "v.blk.0.ffn_gate.weight" not in names and "v.blk.0.ln1.bias" in names
        assert not any(n.startswith("v.position_embd") or n == "v.patch_embd.bias" for n in names)


def test_q8_0_export_keeps_the_f32_answers(exported):
    _, _, (model, mmproj), (q8_model, q8_mmproj), _ = exported
    with GGUFFile(q8_model) as text:
        assert text.tensors["blk.0.attn_q.weight"].qtype == Q.Q8_0
        assert text.tensors["blk.0.attn_q.bias"].qtype == Q.F32
    with GGUFFile(q8_mmproj) as proj:        # the vision side stays F16, 1-D tensors F32
        assert proj.tensors["v.blk.0.attn_q.weight"].qtype == Q.F16
        assert proj.tensors["v.patch_embd.weight.1"].qtype == Q.F16
        assert proj.tensors["v.blk.0.ln1.weight"].qtype == Q.F32
    f32 = foveal.load(str(model), mmproj=str(mmproj), dtype="float32")
    q8 = foveal.load(str(q8_model), mmproj=str(q8_mmproj), dtype="float32")
    for i, (question, size) in enumerate([("Describe it.", (120, 80)), ("What colour?", (90, 90)),
                                          ("How many?", (57, 333))]):
        messages = _ask(question, _image(size, 10 + i))
        expected, actual = f32.prompt_logits(messages)[1], q8.prompt_logits(messages)[1]
        diff = (actual - expected).abs().max().item()
        relative = diff / expected.abs().max().item()
        agree = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(f"Q8_0 vs F32 {size}: max |logit diff| {diff:.3g} ({relative:.2%} of max |logit|), "
              f"argmax agreement {agree:.0%}")
        assert relative <= 0.05 and agree >= 0.9     # Q8_0 weights: ~0.5 % relative error each
        assert q8.generate(messages, max_tokens=8, temperature=0.0).token_ids == \
            f32.generate(messages, max_tokens=8, temperature=0.0).token_ids


def test_text_model_alone_runs_as_a_qwen2_lm(exported, tmp_path):
    """Without its mmproj a qwen2vl file is a text model: text-only M-RoPE is 1-D RoPE."""
    _, _, (model, _), _, ref = exported
    alone = tmp_path / model.name           # apart from the mmproj, which a folder would pair with it
    shutil.copy(model, alone)
    text_only = foveal.load(str(alone), dtype="float32")
    assert text_only.describe()["family"] == "text"
    messages = [{"role": "user", "content": "hello world"}]
    ids, logits = text_only.prompt_logits(messages)
    ref_ids, ref_logits = ref.prompt_logits(messages)
    assert ids == ref_ids and (logits - ref_logits).abs().max().item() <= 1e-3


# ---- bad input: each a clear, typed error ----------------------------------------------------
def _retouched(src: Path, dst: Path, **values) -> Path:
    """A copy of a GGUF with metadata keys replaced (key with '.' spelled '__')."""
    values = {k.replace("__", "."): v for k, v in values.items()}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, values.get(key, field.contents()), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        data = np.asarray(tensor.data)
        if tensor.tensor_type in (Q.F32, Q.F16):
            writer.add_tensor(tensor.name, data.reshape(shape))
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_unknown_projector_type_is_refused(exported, tmp_path):
    _, _, (model, mmproj), _, _ = exported
    bad = _retouched(mmproj, tmp_path / "mmproj.gguf", clip__projector_type="qwen9vl_merger")
    with pytest.raises(UnsupportedModelError, match=r"projector type 'qwen9vl_merger' does not go with a "
                                                    r"qwen2vl language model.*'qwen2vl_merger'"):
        foveal.load(str(model), mmproj=str(bad))


def test_dimension_sections_that_miss_half_the_head_are_refused(exported, tmp_path):
    _, _, (model, mmproj), _, _ = exported
    bad = _retouched(model, tmp_path / "model.gguf", qwen2vl__rope__dimension_sections=[2, 3, 4, 0])
    with pytest.raises(WeightsError, match=r"dimension_sections \[2, 3, 4, 0\] sums to 9.*head_dim / 2 = 8"):
        foveal.load(str(bad), mmproj=str(mmproj))


def test_llava_mmproj_with_a_qwen2vl_model_is_refused(exported, tmp_path):
    _, _, (model, mmproj), _, _ = exported
    bad = _retouched(mmproj, tmp_path / "mmproj.gguf", clip__projector_type="mlp")
    with pytest.raises(UnsupportedModelError, match="'mlp' does not go with a qwen2vl"):
        foveal.load(str(model), mmproj=str(bad))


def test_window_layout_llama_cpp_cannot_hold_is_refused_on_export(exported, tmp_path):
    kind, folder, *_ = exported
    if kind != "qwen2_5_vl":
        pytest.skip("window attention is Qwen2.5-VL's")
    ckpt = read_hf_folder(folder)
    ckpt.config["vision_config"]["fullatt_block_indexes"] = [0, 2]
    with pytest.raises(UnsupportedModelError, match=r"fullatt_block_indexes \[0, 2\].*n_wa_pattern"):
        write_gguf(ckpt, tmp_path, type="f32")
