"""Llama 3.2 Vision from Ollama's store: `ollama:llama3.2-vision` against the same model from safetensors.

A tiny random Mllama (tests/tiny.py, with Llama 3's pre-tokenizer and, as the published checkpoint has
them, the chat template in tokenizer_config.json and CLIP's mean / std) is written as Ollama's converter
writes it (families/mllama/gguf.py, after convert/convert_mllama.go) into one model blob, with template,
license and params blobs and a manifest, laid out as Ollama lays out its store. foveal then loads
`ollama:llama3.2-vision` with OLLAMA_MODELS pointing there and must give the greedy tokens foveal gives
from the safetensors folder, with no image, one image and two images.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import foveal
from foveal.errors import FovealError, ModelNotFoundError, UnsupportedModelError, WeightsError
from foveal.models.families.mllama.gguf import CLIP_MEAN, CLIP_STD, ollama_name, write_ollama_mllama
from foveal.weights.gguf import llama3_rope_factors, llama_qk_order, read_hf_folder, write_gguf
from tiny import MLLAMA_TEMPLATE, build_mllama
from tiny import ask as _ask, random_image as _image

MEDIA = "application/vnd.ollama.image."
# The template and params layers `ollama create` attaches when it recognises a Llama 3 chat template in the
# GGUF (server/model.go detectChatTemplate: template/llama3-instruct.gotmpl and .json, JSON-encoded). The
# library's published llama3.2-vision may carry a hand-written template instead; foveal reads the GGUF's
# own Jinja template, so these layers only have to be there, as in a real store.
GO_TEMPLATE = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
PARAMS = {"stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def _published_layout(folder):
    """What the published checkpoint has and tiny.py leaves out: the chat template inside
    tokenizer_config.json (the only place Ollama's converter reads it) and CLIP's mean / std."""
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": MLLAMA_TEMPLATE}))
    pp = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pp, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    return folder


class Store:
    """Ollama's store: blobs/sha256-<hex> and manifests/registry.ollama.ai/library/NAME/TAG."""

    def __init__(self, root):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def blob(self, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / digest.replace(":", "-")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def add(self, model: bytes, name="llama3.2-vision", tag="latest", projector: bytes | None = None):
        config = self.blob(json.dumps({"model_format": "gguf", "model_family": "mllama",
                                       "model_families": ["mllama"], "file_type": "F16"}).encode())
        layers = [("model", model)] + ([("projector", projector)] if projector else []) + [
            ("template", GO_TEMPLATE.encode()), ("license", b"LLAMA 3.2 COMMUNITY LICENSE AGREEMENT"),
            ("params", (json.dumps(PARAMS) + "\n").encode())]
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
                    "layers": [{"mediaType": MEDIA + kind, **self.blob(data)} for kind, data in layers]}
        path = self.root / "manifests" / "registry.ollama.ai" / "library" / name / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
        return manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _published_layout(build_mllama(tmp_path_factory.mktemp("mllama-hf"), llama3_split=True))


@pytest.fixture(scope="module")
def model_gguf(folder, tmp_path_factory):
    return write_ollama_mllama(read_hf_folder(folder), tmp_path_factory.mktemp("gguf") / "model.gguf",
                               float_type=Q.F32)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    return Store(tmp_path / "models")


@pytest.fixture(scope="module")
def pair(folder, model_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama") / "models"
    Store(root).add(model_gguf.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OLLAMA_MODELS", str(root))
        ours = foveal.load("ollama:llama3.2-vision", dtype="float32")
    return foveal.load(str(folder), dtype="float32"), ours


# --- the file, as the converter writes it -----------------------------------------------
def test_names_are_the_converters():
    """Go's strings.Replacer over convert_llama.go's then convert_mllama.go's pairs."""
    table = {
        "language_model.model.embed_tokens.weight": "token_embd.weight",
        "language_model.lm_head.weight": "output.weight",
        "language_model.model.norm.weight": "output_norm.weight",
        "language_model.model.layers.3.cross_attn.q_proj.weight": "blk.3.cross_attn_q_proj.weight",
        "language_model.model.layers.3.cross_attn.k_norm.weight": "blk.3.cross_attn_k_norm.weight",
        "language_model.model.layers.3.cross_attn_attn_gate": "blk.3.cross_attn_attn_gate",
        "language_model.model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "language_model.model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "vision_model.gated_positional_embedding.embedding": "v.position_embd.weight",
        "vision_model.gated_positional_embedding.tile_embedding.weight": "v.tile_position_embd.weight",
        "vision_model.gated_positional_embedding.gate": "v.position_embd.gate",
        "vision_model.pre_tile_positional_embedding.embedding.weight": "v.pre_tile_position_embd.weight",
        "vision_model.post_tile_positional_embedding.gate": "v.post_tile_position_embd.gate",
        "vision_model.global_transformer.layers.1.gate_ffn": "v.global.blk.1.ffn_gate",
        "vision_model.transformer.layers.2.mlp.fc1.bias": "v.blk.2.ffn_up.bias",
        "vision_model.layernorm_pre.weight": "v.pre_ln.weight",
        "vision_model.class_embedding": "v.class_embd",
        "vision_model.patch_embedding.weight": "v.patch_embd.weight",
        "multi_modal_projector.weight": "mm.0.weight",
    }
    for hf, name in table.items():
        assert ollama_name(hf) == name, hf


def test_the_file_is_what_convert_mllama_writes(folder, tmp_path):
    ck = read_hf_folder(folder)
    path = write_ollama_mllama(ck, tmp_path / "m.gguf")        # F16, as Ollama converts
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "mllama"
    assert r.fields["mllama.attention.cross_attention_layers"].contents() == [1, 3]
    assert r.fields["mllama.vision.max_num_tiles"].contents() == 4
    assert r.fields["mllama.vision.image_size"].contents() == 28
    assert r.fields["mllama.vision.intermediate_layers_indices"].contents() == [0, 2]
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"       # the Llama 3 regex's digest
    tensors = {t.name: t for t in r.tensors}
    assert not [n for n in tensors if not (n.startswith(("v.", "mm.", "blk.")) or n in (
        "token_embd.weight", "output.weight", "output_norm.weight"))]
    types = {n: t.tensor_type for n, t in tensors.items()}
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["v.blk.0.attn_q.weight"] == Q.F16
    for n in ("v.position_embd.weight", "v.tile_position_embd.weight", "v.pre_tile_position_embd.weight",
              "v.blk.0.ffn_up.bias", "blk.0.attn_norm.weight", "v.position_embd.gate"):
        assert types[n] == Q.F32, n

    def data(name):
        t = tensors[name]
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist()))))

    hf = ck.tensors
    lm, vm = "language_model.model.layers.", "vision_model."
    g = hf[vm + "gated_positional_embedding.gate"]
    assert torch.allclose(data("v.position_embd.gate"), 1 - g.tanh())
    assert torch.allclose(data("v.tile_position_embd.gate"), g.tanh())
    assert torch.allclose(data("v.pre_tile_position_embd.gate"), hf[vm + "pre_tile_positional_embedding.gate"].tanh())
    assert torch.allclose(data("v.global.blk.0.attn_gate"), hf[vm + "global_transformer.layers.0.gate_attn"].tanh())
    assert torch.equal(data("blk.1.cross_attn_attn_gate"), hf[lm + "1.cross_attn_attn_gate"])
    # rows of the rotary heads interleaved: text q (4 heads), k (2), cross-attention q / k, vision k (4)
    for name, hf_name, heads in [("blk.0.attn_q.weight", lm + "0.self_attn.q_proj.weight", 4),
                                 ("blk.0.attn_k.weight", lm + "0.self_attn.k_proj.weight", 2),
                                 ("blk.1.cross_attn_q_proj.weight", lm + "1.cross_attn.q_proj.weight", 4),
                                 ("blk.1.cross_attn_k_proj.weight", lm + "1.cross_attn.k_proj.weight", 2),
                                 ("v.global.blk.1.attn_k.weight", vm + "global_transformer.layers.1.self_attn.k_proj.weight", 4)]:
        expected = hf[hf_name][torch.from_numpy(llama_qk_order(hf[hf_name].shape[0], heads))]
        assert torch.allclose(data(name), expected.half().float()), name
        assert not torch.allclose(data(name), hf[hf_name].half().float()), name
    assert torch.equal(data("blk.0.attn_v.weight"), hf[lm + "0.self_attn.v_proj.weight"].half().float())


# --- loading it from the store ----------------------------------------------------------
def test_the_store_loads_as_the_mllama_family(pair):
    hf, ours = pair
    assert ours.family.NAME == "mllama" and ours.describe()["family"] == "mllama"
    assert ours.path.parent.name == "blobs" and ours.path.name.startswith("sha256-")
    assert ours.config.cross_attention_layers == hf.config.cross_attention_layers
    assert ours.config.vision == hf.config.vision and ours.config.image_token_id == hf.config.image_token_id
    assert ours.image_config == hf.image_config          # tiles, max tiles, CLIP mean / std, bilinear
    assert ours.image_config.image_mean == tuple(CLIP_MEAN) and ours.image_config.max_image_tiles == 4
    for (name, a), (_, b) in zip(sorted(hf.model.state_dict().items()), sorted(ours.model.state_dict().items())):
        if a.is_floating_point() and ".kv_cache." not in name:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("images", [[], [(70, 45)], [(300, 50), (57, 333)]], ids=["text", "one-image", "two-images"])
def test_greedy_tokens_match_safetensors(pair, images):
    hf, ours = pair
    messages = _ask("What is in the picture?", *[_image(s, i) for i, s in enumerate(images)])
    a = hf.generate(messages, max_tokens=24, temperature=0.0)
    b = ours.generate(messages, max_tokens=24, temperature=0.0)
    assert b.token_ids == a.token_ids and b.text == a.text
    ids_a, logits_a = hf.prompt_logits(messages)
    ids_b, logits_b = ours.prompt_logits(messages)
    assert ids_a == ids_b
    assert torch.allclose(logits_a, logits_b, atol=1e-4)


def test_f16_export_and_llama3_rope(folder, tmp_path, store):
    """`foveal export` writes the converter's F16 file; Llama 3.1 RoPE scaling goes through rope_freqs."""
    scaled = tmp_path / "scaled"
    shutil.copytree(folder, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 1024}
    (scaled / "config.json").write_text(json.dumps(config))
    path, projector = write_gguf(read_hf_folder(scaled), tmp_path / "out", type="f16")
    assert projector is None
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    store.add(path.read_bytes())
    ours = foveal.load("ollama:llama3.2-vision", dtype="float32")
    ref = foveal.load(str(scaled), dtype="float32")
    # the file holds the per-frequency factors, not original_max_position_embeddings: the parameters come
    # back up to that scale, the frequencies exactly
    a_rope, b_rope = ref.config.text.rope, ours.config.text.rope
    assert a_rope.kind == b_rope.kind == "llama3" and a_rope.theta == b_rope.theta and a_rope.factor == b_rope.factor

    def factors(r):
        return llama3_rope_factors({"rope_theta": r.theta, "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                                    "high_freq_factor": r.high_freq_factor,
                                    "original_max_position_embeddings": r.original_max_position_embeddings}, 16)
    assert np.allclose(factors(a_rope), factors(b_rope), rtol=1e-6) and factors(a_rope).max() == 8.0
    messages = _ask("Describe it.", _image((70, 45)))
    _, a = ref.prompt_logits(messages)
    _, b = ours.prompt_logits(messages)
    assert (a - b).abs().max() < 0.05          # F16 weights
    assert a[-1].argmax() == b[-1].argmax()


# --- a broken or incomplete store --------------------------------------------------------
def _rewrite(src, dst, drop_keys=(), drop_tensors=(), change=None, quantize=(), add_arrays=None):
    """Copy a GGUF, leaving out metadata keys or tensors, changing a tensor's values, storing some as Q8_0,
    or adding integer arrays."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for key, values in (add_arrays or {}).items():
        w.add_array(key, values)
    for key, field in r.fields.items():
        if key in drop_keys or key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = np.array(t.data).reshape(list(reversed(t.shape.tolist())))
        if change and t.name in change:
            data = change[t.name](data)
        if t.name in quantize:
            w.add_tensor(t.name, gguf.quants.quantize(data.astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _load_error(store, data, **kw):
    store.add(data, **kw)
    with pytest.raises(FovealError) as e:
        foveal.load("ollama:llama3.2-vision", dtype="float32")
    return e


def test_a_missing_tensor_is_named(model_gguf, store, tmp_path):
    bad = _rewrite(model_gguf, tmp_path / "bad.gguf", drop_tensors={"v.global.blk.1.ffn_gate"})
    e = _load_error(store, bad.read_bytes())
    assert e.type is WeightsError and "v.global.blk.1.ffn_gate" in str(e.value)


def test_a_missing_metadata_key_is_named(model_gguf, store, tmp_path):
    bad = _rewrite(model_gguf, tmp_path / "bad.gguf", drop_keys={"mllama.vision.max_num_tiles"})
    e = _load_error(store, bad.read_bytes())
    assert e.type is WeightsError and "mllama.vision.max_num_tiles" in str(e.value)


def test_a_text_only_mllama_file_is_refused(model_gguf, store, tmp_path):
    r = gguf.GGUFReader(model_gguf)
    bad = _rewrite(model_gguf, tmp_path / "bad.gguf",
                   drop_tensors={t.name for t in r.tensors if t.name.startswith(("v.", "mm."))})
    e = _load_error(store, bad.read_bytes())
    assert e.type is WeightsError and "no v.* tensors" in str(e.value)


def test_gates_that_disagree_are_refused(model_gguf, store, tmp_path):
    bad = _rewrite(model_gguf, tmp_path / "bad.gguf", change={"v.position_embd.gate": lambda d: d * 0 + 0.9})
    e = _load_error(store, bad.read_bytes())
    assert e.type is WeightsError and "v.position_embd.gate" in str(e.value)


def test_the_old_two_blob_layout_is_refused(model_gguf, store):
    """A model blob with a projector blob: Ollama's pre-2025 llama3.2-vision, which Ollama refuses too."""
    e = _load_error(store, model_gguf.read_bytes(), projector=b"GGUF-old-projector")
    assert e.type is UnsupportedModelError
    assert "ollama pull llama3.2-vision" in str(e.value) and "projector" in str(e.value)


def test_a_missing_or_truncated_blob_is_named(model_gguf, store):
    manifest = store.add(model_gguf.read_bytes())
    blob = store.root / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="partial download"):
        foveal.load("ollama:llama3.2-vision", dtype="float32")
    blob.unlink()
    with pytest.raises(ModelNotFoundError, match=manifest["layers"][0]["digest"]):
        foveal.load("ollama:llama3.2-vision", dtype="float32")


def test_the_store_resolves_as_one_vision_blob(model_gguf, store):
    from foveal.weights.resolve import list_models, resolve
    store.add(model_gguf.read_bytes())
    found = resolve("ollama:llama3.2-vision")
    assert found.kind == "gguf" and found.mmproj is None and found.is_vlm and found.source == "ollama"
    assert found.name == "llama3.2-vision:latest" and found.path.read_bytes()[:4] == b"GGUF"
    assert found.template == GO_TEMPLATE and found.params == PARAMS
    assert [m.is_vlm for m in list_models() if m.name == "llama3.2-vision:latest"] == [True]


def test_a_quantized_blob_loads(model_gguf, store, tmp_path, pair):
    """Ollama publishes quantized blobs: Q8_0 matrices (rows permuted in their quantized blocks) read back."""
    r = gguf.GGUFReader(model_gguf)
    quantized = {t.name for t in r.tensors if len(t.shape) == 2 and t.shape[0] % 32 == 0
                 and t.name not in ("token_embd.weight", "v.tile_position_embd.weight")}
    assert {"blk.0.attn_q.weight", "blk.1.cross_attn_k_proj.weight", "v.blk.0.attn_q.weight"} <= quantized
    q8 = _rewrite(model_gguf, tmp_path / "q8.gguf", quantize=quantized)
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}["blk.0.attn_q.weight"] == Q.Q8_0
    store.add(q8.read_bytes())
    ours = foveal.load("ollama:llama3.2-vision", dtype="float32")
    hf, _ = pair
    theirs = hf.model.state_dict()
    for name, w in ours.model.state_dict().items():    # within Q8_0's rounding: every row in its place
        if w.is_floating_point() and w.dim() == 2 and ".kv_cache." not in name:
            bound = theirs[name].abs().amax(dim=-1, keepdim=True) / 100
            assert ((w - theirs[name]).abs() <= bound).all(), name
    messages = _ask("What is in the picture?", _image((70, 45)))
    _, a = hf.prompt_logits(messages)
    _, b = ours.prompt_logits(messages)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_a_blob_without_a_chat_template_is_named(model_gguf, store, tmp_path):
    """Ollama's own template layer is a Go template: the prompt needs the GGUF's Jinja one."""
    bad = _rewrite(model_gguf, tmp_path / "bad.gguf", drop_keys={"tokenizer.chat_template"})
    e = _load_error(store, bad.read_bytes())
    assert "tokenizer.chat_template" in str(e.value)


def test_two_images_over_the_ollama_api(pair, tmp_path):
    """Ollama's own server takes one image per llama3.2-vision request; foveal's answers two, and the official
    client gets the same reply from the store's blob as from the safetensors folder."""
    import ollama
    from live_server import MODEL, LiveServer
    paths = []
    for i, size in enumerate([(300, 50), (57, 333)]):
        paths.append(tmp_path / f"{i}.png")
        _image(size, i).save(paths[-1])
    replies = []
    for vlm in pair:
        with LiveServer(vlm) as server:
            client = ollama.Client(host=server.url)
            r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Compare them.",
                                                    "images": [str(p) for p in paths]}],
                            options={"temperature": 0, "num_predict": 16})
            replies.append((r.message.content, r.eval_count, r.prompt_eval_count))
    assert replies[0] == replies[1] and replies[0][1] > 0


def test_a_bf16_checkpoint_converts_as_ollama_converts_it(folder, tmp_path, store):
    """The published checkpoint is BF16: the converter keeps its text matrices BF16, the tower and projector
    F16; read back in float32, the tokens are the safetensors folder's."""
    from safetensors.torch import load_file, save_file
    bf16 = tmp_path / "bf16"
    shutil.copytree(folder, bf16)
    weights = load_file(bf16 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, bf16 / "model.safetensors",
              metadata={"format": "pt"})
    path = write_ollama_mllama(read_hf_folder(bf16), tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == types["blk.1.cross_attn_k_proj.weight"] == Q.BF16
    assert types["v.blk.0.attn_q.weight"] == types["mm.0.weight"] == Q.F16 and types["blk.0.attn_norm.weight"] == Q.F32
    store.add(path.read_bytes())
    ours = foveal.load("ollama:llama3.2-vision", dtype="float32")
    ref = foveal.load(str(bf16), dtype="float32")
    messages = _ask("What is in the picture?", _image((70, 45)), _image((20, 30), 1))
    assert ours.generate(messages, max_tokens=16, temperature=0.0).token_ids == \
        ref.generate(messages, max_tokens=16, temperature=0.0).token_ids


def test_generation_configs_stop_tokens_are_read(model_gguf, store, tmp_path):
    """convert/tokenizer.go writes generation_config.json's eos_token_id list as tokenizer.ggml.eos_token_ids
    (Llama 3.2 Vision's: <|end_of_text|>, <|eom_id|>, <|eot_id|>): every one of them stops generation."""
    r = gguf.GGUFReader(model_gguf)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    ids = [tokens.index("<|end_of_text|>"), tokens.index("<|eot_id|>")]
    good = _rewrite(model_gguf, tmp_path / "eos.gguf", add_arrays={"tokenizer.ggml.eos_token_ids": ids})
    store.add(good.read_bytes())
    ours = foveal.load("ollama:llama3.2-vision", dtype="float32")
    assert set(ids) <= set(ours.engine.eos_ids)
