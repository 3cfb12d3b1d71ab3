"""Gemma 3 as GGUF: a `gemma3` text model and a `gemma3` mmproj, written as llama.cpp's converter writes them and
read back by foveal.

A tiny random Gemma3ForConditionalGeneration saved by save_pretrained (tests/tiny.py) with Gemma's own tokenizer
form (byte fallback, `▁` pieces, `<0xXX>` bytes) and query_pre_attn_scalar = head_dim (what llama.cpp's graph
uses); the references are foveal's load of the HF folder (held to transformers by tests/test_gemma3.py) and
transformers itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, TokenType
from safetensors.torch import load_file

import foveal
from foveal.cli import main as cli_main
from foveal.errors import UnsupportedModelError, WeightsError
from foveal.models.families.gemma3.gguf import _attention_layout, _query_scalar
from foveal.weights.gguf import GGUFFile, read_gguf, read_hf_folder, write_gguf
from tiny import build_gemma3, hf_gemma3, hf_gemma3_processor
from tiny import ask as _ask, random_image as _image


def _hf_inputs(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-gguf")
    folder = build_gemma3(root / "hf", tokenizer="sentencepiece", query_pre_attn_scalar=16)
    f32 = write_gguf(read_hf_folder(folder), root / "f32", type="f32")
    assert cli_main(["export", str(folder), "--gguf", str(root / "q8"), "--type", "q8_0"]) == 0
    q8 = (next((root / "q8").glob("*-Q8_0.gguf")), next((root / "q8").glob("mmproj-*.gguf")))
    ours = foveal.load(str(f32[0]), mmproj=str(f32[1]), dtype="float32")
    return SimpleNamespace(folder=folder, f32=f32, q8=q8, ours=ours, ref=foveal.load(str(folder), dtype="float32"),
                           hf=hf_gemma3(folder), processor=hf_gemma3_processor(folder))


@pytest.mark.parametrize("size", [(50, 37), (57, 333), (333, 57)])     # odd, tall, wide
def test_f32_export_gives_the_folders_and_transformers_logits(exported, size):
    e = exported
    assert e.ours.describe()["family"] == "gemma3"
    messages = _ask("What is in this image?", _image(size))
    ids, logits = e.ours.prompt_logits(messages)
    ref_ids, ref_logits = e.ref.prompt_logits(messages)
    hf_inputs = _hf_inputs(e.processor, messages)
    assert ids == ref_ids == hf_inputs["input_ids"][0].tolist()   # template + tokenizer from the GGUF metadata
    with torch.no_grad():
        hf_logits = e.hf(**hf_inputs).logits[0]
    diff = (logits - ref_logits).abs().max().item()
    print(f"{size}: max |logit diff| F32 GGUF vs HF folder = {diff:.3g}, vs transformers = "
          f"{(logits - hf_logits).abs().max().item():.3g}")
    assert diff <= 1e-3 and (logits - hf_logits).abs().max().item() <= 1e-3
    assert len(ids) > e.ours.config.text.sliding_window


def test_f32_export_answers_like_the_folder_over_two_images_past_the_window(exported):
    e = exported
    messages = _ask("Compare these. Describe the picture in detail.", _image((100, 60), 1), _image((64, 200), 2))
    for vlm in (e.ours, e.ref):
        vlm.engine.eos_ids, vlm._eos = set(), vlm.engine.eos_ids
    try:
        ours = e.ours.generate(messages, max_tokens=32, temperature=0.0)
        ref = e.ref.generate(messages, max_tokens=32, temperature=0.0)
    finally:
        for vlm in (e.ours, e.ref):
            vlm.engine.eos_ids = vlm._eos
    assert ours.token_ids == ref.token_ids and len(set(ref.token_ids)) > 4
    assert ours.stats.images == 2 and ours.stats.image_tokens == 8


def test_config_read_back_is_the_folders(exported):
    ours, ref = exported.ours.config, exported.ref.config
    assert ours.text.layer_types == ref.text.layer_types == ("sliding_attention", "full_attention",
                                                             "sliding_attention")
    assert (ours.text.sliding_window, ours.text.query_pre_attn_scalar) == (ref.text.sliding_window, 16)
    assert (ours.text.rope.kind, ours.text.rope.factor, ours.text.rope.theta) == ("linear", 8.0, 1e6)
    assert ours.text.local_rope.theta == 1e4 and ours.text.local_rope.kind == "default"
    assert (ours.mm_tokens_per_image, ours.boi_token_id, ours.eoi_token_id, ours.image_token_id) == (
        ref.mm_tokens_per_image, ref.boi_token_id, ref.eoi_token_id, ref.image_token_id)
    assert ours.vision == ref.vision


def test_written_metadata_and_names_are_llama_cpps(exported):
    e = exported
    hf = load_file(e.folder / "model.safetensors")
    model, mmproj = e.f32
    with GGUFFile(model) as text:
        meta = text.metadata
        assert meta["general.architecture"] == "gemma3"
        assert meta["gemma3.attention.sliding_window"] == 8 and meta["gemma3.rope.freq_base"] == 1e6
        assert meta["gemma3.rope.freq_base_swa"] == 1e4
        assert (meta["gemma3.rope.scaling.type"], meta["gemma3.rope.scaling.factor"]) == ("linear", 8.0)
        assert meta["gemma3.attention.sliding_window_pattern"].tolist() == [True, False, True]
        assert meta["gemma3.attention.key_length"] == 16 and meta["gemma3.attention.head_count_kv"] == 2
        assert "gemma3.final_logit_softcapping" not in meta
        assert {"token_embd.weight", "output_norm.weight", "blk.2.attn_q_norm.weight", "blk.2.attn_k_norm.weight",
                "blk.2.post_attention_norm.weight", "blk.2.ffn_norm.weight", "blk.2.post_ffw_norm.weight"} \
            <= set(text.tensors)
        assert "output.weight" not in text.tensors           # tied, as the converter leaves it
        # Gemma's (1 + w) norms are stored as w + 1; the other tensors as they are
        for gguf_name, hf_name in (("blk.1.attn_norm.weight", "layers.1.input_layernorm.weight"),
                                   ("blk.1.attn_q_norm.weight", "layers.1.self_attn.q_norm.weight"),
                                   ("blk.1.ffn_norm.weight", "layers.1.pre_feedforward_layernorm.weight"),
                                   ("blk.1.post_ffw_norm.weight", "layers.1.post_feedforward_layernorm.weight"),
                                   ("output_norm.weight", "norm.weight")):
            assert torch.equal(text.tensor(gguf_name, torch.float32), hf[f"language_model.model.{hf_name}"] + 1)
        assert torch.equal(text.tensor("blk.1.attn_q.weight", torch.float32),
                           hf["language_model.model.layers.1.self_attn.q_proj.weight"])   # NEOX: unpermuted
        # the tokenizer as llama.cpp's SentencePiece vocabulary: byte pieces, specials, no prefix space
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is False
        assert meta["tokenizer.ggml.add_bos_token"] is True and tokens[meta["tokenizer.ggml.bos_token_id"]] == "<bos>"
        assert types[tokens.index("<0x0A>")] == TokenType.BYTE
        for special in ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>"):
            assert types[tokens.index(special)] == TokenType.CONTROL
        assert types[tokens.index("<mask>")] == TokenType.USER_DEFINED
        assert "<start_of_image>" in meta["tokenizer.chat_template"]
    with GGUFFile(mmproj) as proj:
        meta = proj.metadata
        assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "gemma3"
        assert meta["clip.vision.projection_dim"] == 64 and meta["clip.vision.image_size"] == 32
        assert meta["clip.vision.projector.scale_factor"] == 2      # 4 patches a side pooled to 2
        assert meta["clip.use_gelu"] is True and meta["clip.vision.block_count"] == 2
        assert torch.equal(proj.tensor("mm.input_projection.weight", torch.float32),
                           hf["multi_modal_projector.mm_input_projection_weight"])
        assert torch.equal(proj.tensor("mm.soft_emb_norm.weight", torch.float32),
                           hf["multi_modal_projector.mm_soft_emb_norm.weight"] + 1)
        assert torch.equal(proj.tensor("v.post_ln.weight", torch.float32), hf["vision_tower.post_layernorm.weight"])
        assert torch.equal(proj.tensor("v.blk.0.ln1.weight", torch.float32),
                           hf["vision_tower.encoder.layers.0.layer_norm1.weight"])      # SigLIP's: as they are
        assert {"v.patch_embd.bias", "v.position_embd.weight", "v.blk.1.ffn_up.weight", "v.blk.1.ffn_down.bias"} \
            <= set(proj.tensors)


def test_tokenizer_from_the_gguf_encodes_and_decodes_like_the_folders(exported):
    ours, ref = exported.ours.tokenizer, exported.ref.tokenizer
    for text in ["hello world", " leading space", "two  spaces\n\nand lines", "emoji 🙂 and 日本語, unseen 🚀€",
                 "<start_of_turn>user\n<start_of_image><end_of_image><end_of_turn>", "a<mask>b", ""]:
        ids = ref.tok.encode(text).ids
        assert ours.tok.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert any(ours.tok.id_to_token(i).startswith("<0x") for i in ours.tok.encode("🚀").ids)   # byte fallback


def test_reading_the_export_again_gives_the_same_files(exported, tmp_path):
    """GGUF -> HFCheckpoint -> GGUF: the (1 + w) shift is undone on read and redone on write, exactly at F32."""
    model, mmproj = exported.f32
    again = write_gguf(read_gguf(model, mmproj, dtype=torch.float32), tmp_path, type="f32")
    for first, second in zip((model, mmproj), again):
        with GGUFFile(first) as a, GGUFFile(second) as b:
            assert set(a.tensors) == set(b.tensors)
            for name in a.tensors:
                assert torch.equal(a.tensor(name, torch.float32), b.tensor(name, torch.float32)), name
            keys = set(a.metadata) - {"general.name"}
            assert keys == set(b.metadata) - {"general.name"}


def test_q8_0_export_keeps_the_f32_answers(exported):
    model, mmproj = exported.q8
    with GGUFFile(model) as text:
        assert text.tensors["blk.0.attn_q.weight"].qtype == Q.Q8_0
        assert text.tensors["blk.0.attn_q_norm.weight"].qtype == Q.F32
        assert text.tensors["token_embd.weight"].qtype == Q.F16          # the tied head's default under q8_0
    with GGUFFile(mmproj) as proj:      # as the converter: F16 weights, F32 embeddings and 1-D tensors
        assert proj.tensors["mm.input_projection.weight"].qtype == Q.F16
        assert proj.tensors["v.blk.0.attn_q.weight"].qtype == Q.F16
        assert proj.tensors["v.patch_embd.weight"].qtype == Q.F32
        assert proj.tensors["v.position_embd.weight"].qtype == Q.F32
    q8 = foveal.load(str(model), mmproj=str(mmproj), dtype="float32")
    f32 = exported.ours
    for i, size in enumerate([(120, 80), (90, 90), (57, 333)]):
        messages = _ask("Describe it.", _image(size, 10 + i))
        expected, actual = f32.prompt_logits(messages)[1], q8.prompt_logits(messages)[1]
        relative = (actual - expected).abs().max().item() / expected.abs().max().item()
        agree = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(f"Q8_0 vs F32 {size}: {relative:.2%} of max |logit|, argmax agreement {agree:.0%}")
        assert relative <= 0.05 and agree >= 0.9


# ---- what llama.cpp fixes rather than stores ---------------------------------------------------
def _layout(n_layers, **meta):
    return _attention_layout(SimpleNamespace(path=Path("m.gguf"), metadata={f"gemma3.{k.replace('__', '.')}": v
                                                                            for k, v in meta.items()}), n_layers)


def test_llama_cpps_defaults_for_keys_the_converter_leaves_out():
    layout = _layout(12, attention__sliding_window=1024, rope__freq_base=1e6)   # gemma-3 as converted
    assert [i for i, t in enumerate(layout["layer_types"]) if t == "full_attention"] == [5, 11]
    assert layout["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert layout["rope_parameters"]["full_attention"] == {"rope_type": "default", "rope_theta": 1e6}
    assert set(_layout(4)["layer_types"]) == {"full_attention"}            # no window: every layer is global
    assert _layout(4, attention__sliding_window=8, attention__sliding_window_pattern=2)["layer_types"] == [
        "sliding_attention", "full_attention"] * 2
    assert _layout(3, attention__sliding_window=8, attention__sliding_window_pattern=np.array(
        [False, True, True]))["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert _layout(2, rope__scaling__type="linear", rope__scaling__factor=8.0)["rope_parameters"][
        "full_attention"] == {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 8.0}
    # attention scale: head_dim ** -0.5, hidden / heads for the 62-layer 27B (query_pre_attn_scalar 168)
    assert _query_scalar(34, 2560, 8, 256) == 256 and _query_scalar(62, 5376, 32, 128) == 168


def test_rope_scaling_foveal_does_not_run_is_refused():
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'yarn'"):
        _layout(2, rope__scaling__type="yarn", rope__scaling__factor=8.0)


# ---- bad input: each a clear, typed error -----------------------------------------------------
def _rewritten(src: Path, dst: Path, *, drop=(), **values) -> Path:
    """A copy of a GGUF with metadata keys replaced (key with '.' spelled '__') and tensors dropped."""
    values = {k.replace("__", "."): v for k, v in values.items()}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, values.get(key, field.contents()), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name in drop:
            continue
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


def test_text_model_without_its_mmproj_is_refused_by_name(exported, tmp_path):
    alone = tmp_path / exported.f32[0].name          # apart from the mmproj, which a folder would pair with it
    shutil.copy(exported.f32[0], alone)
    with pytest.raises(UnsupportedModelError, match="Gemma 3 language model.*pass its mmproj"):
        foveal.load(str(alone))


def test_mmproj_of_another_projector_is_refused(exported, tmp_path):
    model, mmproj = exported.f32
    bad = _rewritten(mmproj, tmp_path / "mmproj.gguf", clip__projector_type="mlp")
    with pytest.raises(UnsupportedModelError, match="projector type 'mlp' does not go with a gemma3"):
        foveal.load(str(model), mmproj=str(bad))


def test_mmproj_of_another_width_is_refused(exported, tmp_path):
    model, _ = exported.f32
    other = build_gemma3(tmp_path / "other", tokenizer="sentencepiece", query_pre_attn_scalar=16)
    ckpt = read_hf_folder(other)
    ckpt.tensors["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(32, 48)
    _, mmproj = write_gguf(ckpt, tmp_path / "out", type="f32")
    with pytest.raises(WeightsError, match="projects to width 48 but the language model's is 64.*do not belong"):
        foveal.load(str(model), mmproj=str(mmproj))


def test_mmproj_missing_its_norm_or_truncated_is_refused(exported, tmp_path):
    model, mmproj = exported.f32
    bad = _rewritten(mmproj, tmp_path / "mmproj.gguf", drop={"mm.soft_emb_norm.weight"})
    with pytest.raises(WeightsError, match="mm.soft_emb_norm.weight is missing from a gemma3 mmproj"):
        foveal.load(str(model), mmproj=str(bad))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mmproj.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated"):
        foveal.load(str(model), mmproj=str(cut))


def test_vocabulary_without_the_image_token_is_refused(exported, tmp_path):
    model, mmproj = exported.f32
    with GGUFFile(model) as text:
        tokens = [t if t != "<image_soft_token>" else "<not_an_image>" for t in text.metadata["tokenizer.ggml.tokens"]]
    bad = _rewritten(model, tmp_path / "model.gguf", tokenizer__ggml__tokens=tokens)
    with pytest.raises(WeightsError, match="no <image_soft_token> token"):
        foveal.load(str(bad), mmproj=str(mmproj))


def test_export_refuses_what_llama_cpp_would_run_differently(exported, tmp_path):
    ckpt = read_hf_folder(exported.folder)
    ckpt.config["text_config"]["query_pre_attn_scalar"] = 24
    with pytest.raises(UnsupportedModelError, match="query_pre_attn_scalar is 24.*head_dim"):
        write_gguf(ckpt, tmp_path, type="f32")
    ckpt = read_hf_folder(exported.folder)
    ckpt.config["text_config"]["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 1e4}
    with pytest.raises(UnsupportedModelError, match="sliding layers with an unscaled RoPE"):
        write_gguf(ckpt, tmp_path, type="f32")
    assert not list(tmp_path.glob("*.gguf"))


def test_a_single_file_with_the_vision_tower_inside_is_refused_by_name(exported, tmp_path):
    """Ollama's own Gemma 3 blobs keep `v.*` / `mm.*` tensors in the text model's file."""
    model, mmproj = exported.f32
    reader = gguf.GGUFReader(model)
    writer = gguf.GGUFWriter(tmp_path / "one.gguf", "gemma3")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in [*reader.tensors, *gguf.GGUFReader(mmproj).tensors]:
        writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(tuple(int(n) for n in reversed(tensor.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="vision tower in the language model's file.*plus its mmproj"):
        foveal.load(str(tmp_path / "one.gguf"))


# ---- llama.cpp itself on the export (optional: llama-cpp-python is not in CI, see tests/test_llama_cpp.py) ----
@pytest.fixture(scope="module")
def llama(exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(exported.f32[0]), n_ctx=256, n_threads=2, n_gpu_layers=0, logits_all=True,
                          verbose=False)
    yield llm
    llm.close()


def test_llama_cpp_reads_the_export_to_foveals_tokens_and_logits(exported, llama):
    """Names, norms (+1), the sliding-window pattern, both RoPEs and the attention scale as llama.cpp reads them."""
    ours = exported.ours
    for text in ["hello world, the quick brown fox", "<start_of_turn>user\nhi<end_of_turn>\n", "unseen 🚀€"]:
        assert llama.tokenize(text.encode(), add_bos=True, special=True) == ours.tokenizer.tok.encode(text).ids, text
    messages = [{"role": "user", "content": "Describe the picture in detail. The quick brown fox jumps."}]
    ids, logits = ours.prompt_logits(messages)
    assert len(ids) > 2 * ours.config.text.sliding_window
    llama.reset()
    llama.eval(ids)
    theirs = torch.from_numpy(np.array(llama.scores[:len(ids)], dtype=np.float32))
    diff = (theirs - logits).abs().max().item() / logits.abs().max().item()
    print(f"llama.cpp vs foveal, F32 gemma3 GGUF: max |logit diff| {diff:.2%} of max |logit|")
    assert diff <= 1e-2 and (theirs.argmax(-1) == logits.argmax(-1)).float().mean() >= 0.95


def test_llama_cpps_mtmd_encodes_the_exported_mmproj_to_foveals_embeddings(exported, llama):
    """mtmd's gemma3 graph (pooling by clip.vision.projector.scale_factor, soft_emb_norm, input projection) on a
    32-px image (no resize on either side)."""
    from test_llama_cpp import llama_cpp_image_embeddings
    ours = exported.ours
    image = _image((32, 32), 7)
    theirs = llama_cpp_image_embeddings(llama, exported.f32[1], image)
    with torch.inference_mode():
        mine = ours.model.encode(ours.processor.pixels(ours.processor.prepare(_ask("x", image),
                                                                               ours.image_limits).images))[0]
    assert theirs.shape == mine.shape == (4, 64)
    assert (mine - theirs).abs().max() <= 3e-3 * mine.abs().max()
