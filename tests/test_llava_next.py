"""LLaVA-NeXT (LLaVA-1.6 "anyres") against transformers' LlavaNextForConditionalGeneration.

A tiny HF checkpoint with 32-px tiles and HF-style pinpoints; images of many sizes and aspects, so the
tile grid, the unpadding and the per-row image_newline are all exercised. float32: token ids equal to
the HF processor's, logits within 1e-4, greedy tokens identical.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import foveal
import tiny
from foveal.errors import ConfigError, UnsupportedModelError
from foveal.processing.images import preprocess_views
from test_parity import conversation, hf_inputs, photo

SIZES = [(45, 37), (20, 61), (200, 50), (32, 32), (100, 100), (9, 300), (300, 9), (64, 32), (33, 95)]  # (w, h)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava_next(tmp_path_factory.mktemp("llava-next"))


@pytest.fixture(scope="module")
def models(folder):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    hf = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return foveal.load(folder, dtype="float32"), hf, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_and_ids_match_transformers(models, size):
    vlm, hf, processor = models
    images = [photo(*size, 1)]
    inputs = hf_inputs(processor, images)
    ids, logits = vlm.prompt_logits(conversation(images))
    assert ids == inputs["input_ids"][0].tolist(), "token ids (the image token count) differ from HF's"
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_two_images_of_different_sizes(models):
    vlm, hf, processor = models
    images = [photo(45, 37, 1), photo(20, 61, 2)]
    inputs = hf_inputs(processor, images)
    ids, logits = vlm.prompt_logits(conversation(images))
    assert ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(models):
    vlm, hf, processor = models
    images = [photo(70, 30, 3)]
    inputs = hf_inputs(processor, images, "Tell me a story.")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=24, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    ref = ref[:next((i for i, t in enumerate(ref) if t in vlm.engine.eos_ids), len(ref))]
    result = vlm.generate(conversation(images, "Tell me a story."), max_tokens=24)
    assert result.token_ids == ref
    assert result.stats.image_tokens == vlm.config.image_tokens((30, 70))


def test_views_match_hf_pixel_values(models):
    vlm, hf, processor = models
    for w, h in SIZES:
        img = photo(w, h, w)
        ref = processor.image_processor(img, return_tensors="pt")
        ours = preprocess_views(img, vlm.image_config)
        assert ref["image_sizes"][0].tolist() == [h, w]
        assert ours.shape[0] <= ref["pixel_values"].shape[1]
        assert (ours - ref["pixel_values"][0, :ours.shape[0]]).abs().max().item() <= 1e-5


def test_token_counts_match_the_hf_processor(models):
    """The count comes from the size alone (before encoding): equal to HF's for many sizes and aspects."""
    vlm, hf, processor = models
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(8, 400, size=(300, 2))] + [(8, 8), (1000, 8), (8, 1000)]
    ref = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [vlm.config.image_tokens(s) for s in sizes] == ref
    assert vlm.max_image_tokens == max(vlm.config.image_tokens(p) for p in tiny.NEXT_PINPOINTS) > 16
    assert vlm.image_tokens_per_image == 16


def test_image_features_match_hf_packing(models):
    vlm, hf, processor = models
    img = photo(200, 50, 4)
    inputs = processor.image_processor(img, return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=inputs["pixel_values"],
                                          image_sizes=inputs["image_sizes"]).pooler_output[0]
        ours = vlm.model.encode_anyres(preprocess_views(img, vlm.image_config), (50, 200))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_prefix_cache_with_images_of_different_sizes(models):
    """The KV-cache reuse keys image rows by (image, row): a second turn reuses the first image's rows, a
    different image of another size is recomputed, and both answers equal a fresh computation."""
    vlm, hf, processor = models
    a, b = photo(45, 37, 1), photo(20, 61, 2)
    first = vlm.generate(conversation([a], "Count."), max_tokens=4)
    again = vlm.generate(conversation([a], "Count."), max_tokens=4)
    assert again.stats.cached_tokens > vlm.config.image_tokens((37, 45))
    assert again.token_ids == first.token_ids
    other = vlm.generate(conversation([b], "Count."), max_tokens=4)
    assert other.stats.cached_tokens < 5          # only the text before the image is shared
    vlm.unload()
    fresh = vlm.generate(conversation([b], "Count."), max_tokens=4)
    assert fresh.token_ids == other.token_ids


def test_count_tokens_depends_on_the_image(models):
    vlm, hf, processor = models
    wide, tall = vlm.count_tokens(conversation([photo(200, 50, 1)])), vlm.count_tokens(conversation([photo(50, 200, 1)]))
    assert wide - tall == vlm.config.image_tokens((50, 200)) - vlm.config.image_tokens((200, 50))
    assert wide == len(hf_inputs(processor, [photo(200, 50, 1)])["input_ids"][0])


def test_saved_checkpoint_loads_in_transformers(models, tmp_path):
    """foveal's own save (quantize --save, training) keeps a LLaVA-NeXT model a LLaVA-NeXT model."""
    from transformers import LlavaNextForConditionalGeneration
    from foveal.weights.save import save_checkpoint
    vlm, hf, processor = models
    out = save_checkpoint(vlm.model, vlm.config, tmp_path / "saved",
                          tokenizer_json=vlm.tokenizer.tok.to_str(), tokenizer_config=vlm.tokenizer.config)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["image_grid_pinpoints"] == tiny.NEXT_PINPOINTS
    again = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    inputs = hf_inputs(processor, [photo(70, 30, 5)])
    with torch.no_grad():       # (foveal keeps only the tower layers the features use: the rest are unused)
        assert (again(**inputs).logits - hf(**inputs).logits).abs().max().item() <= 1e-5
    reloaded = foveal.load(out, dtype="float32")       # no processor saved: tiles from config.json's pinpoints
    img = photo(70, 30, 5)
    assert torch.equal(reloaded.prompt_logits(conversation([img]))[1], vlm.prompt_logits(conversation([img]))[1])


def test_original_llava_16_layout(folder, models, tmp_path):
    """The original LLaVA-1.6 repo layout (image_aspect_ratio anyres, model.image_newline, a separate CLIP
    tower with a plain CLIP processor) tiles and packs exactly like the llava-hf conversion."""
    from transformers import CLIPImageProcessor, CLIPVisionModel
    vlm, hf, processor = models
    sd = hf.state_dict()
    tower = tmp_path / "tower"
    clip = CLIPVisionModel(hf.config.vision_config).eval()
    clip.load_state_dict({k[len("model.vision_tower."):]: v for k, v in sd.items()
                          if k.startswith("model.vision_tower.")}, strict=True)
    clip.save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower)
    orig = tmp_path / "llava-v1.6-tiny"
    orig.mkdir()
    text = json.loads((folder / "config.json").read_text())["text_config"]
    config = {k: v for k, v in text.items() if k not in ("architectures", "dtype")} | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": str(tower),
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": tiny.NEXT_PINPOINTS}
    (orig / "config.json").write_text(json.dumps(config))
    renames = {"model.language_model.": "model.", "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
               "model.multi_modal_projector.linear_2.": "model.mm_projector.2.", "lm_head.": "lm_head.",
               "model.image_newline": "model.image_newline"}
    weights = {new + k[len(old):]: v.contiguous() for k, v in sd.items() for old, new in renames.items()
               if k.startswith(old)}
    save_file(weights, orig / "model.safetensors", metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, orig / f)
    o = foveal.load(orig, dtype="float32")
    assert o.config.anyres and o.config.layout == "original"
    for w, h in [(200, 50), (33, 95)]:
        img = photo(w, h, 6)
        with torch.no_grad():
            ours = o.model.encode_anyres(preprocess_views(img, o.image_config), (h, w))
            ref = vlm.model.encode_anyres(preprocess_views(img, vlm.image_config), (h, w))
        assert torch.equal(ours, ref)
    config["mm_patch_merge_type"] = "flat"
    (orig / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="mm_patch_merge_type 'flat'"):
        foveal.load(orig, dtype="float32")


def test_bad_anyres_configs_are_refused(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((folder / "config.json").read_text())
    for pinpoints, message in [([[48, 64]], "not a grid"), ([], "list of 1-64"), ([[32]], "pair"),
                               ([[32, -64]], "pair"), ([[32, 32 * 65]], "not a grid")]:
        (bad / "config.json").write_text(json.dumps(cfg | {"image_grid_pinpoints": pinpoints}))
        with pytest.raises(ConfigError, match=message):
            foveal.load(bad, dtype="float32")
    (bad / "config.json").write_text(json.dumps(cfg | {"vision_feature_select_strategy": "full"}))
    with pytest.raises(UnsupportedModelError, match="4x4 grid"):
        foveal.load(bad, dtype="float32")
    (bad / "config.json").write_text(json.dumps(cfg | {"image_grid_pinpoints": [[32, 64], [64, 32]]}))
    with pytest.raises(ConfigError, match="differ from config.json"):
        foveal.load(bad, dtype="float32")
    with pytest.raises(ConfigError, match="does not apply to an anyres"):
        foveal.load(folder, dtype="float32", image_mode="pad")


def test_a_bad_image_is_refused_and_the_model_keeps_working(models):
    vlm, hf, processor = models
    with pytest.raises(foveal.errors.ImageError):
        vlm.generate(conversation([b"not an image"]), max_tokens=2)
    assert vlm.generate(conversation([photo(40, 20, 1)]), max_tokens=2).stats.generated_tokens >= 1


def test_gguf_export_round_trip_keeps_anyres(folder, models, tmp_path):
    """foveal export writes a LLaVA-1.6 mmproj (pinpoints, spatial_unpad, model.image_newline) as llama.cpp's
    llava-1.6 conversion does; reading it back tiles the same way and gives the same logits (F32)."""
    from gguf import GGUFReader
    from foveal.weights.gguf import read_hf_folder, write_gguf
    vlm, hf, processor = models
    text, mmproj = write_gguf(read_hf_folder(folder), tmp_path, type="f32")
    meta = GGUFReader(mmproj)
    flat = meta.fields["clip.vision.image_grid_pinpoints"]
    assert [int(flat.parts[i][0]) for i in flat.data] == [x for p in tiny.NEXT_PINPOINTS for x in p]
    assert bytes(meta.fields["clip.vision.mm_patch_merge_type"].parts[-1]).decode() == "spatial_unpad"
    assert "model.image_newline" in {t.name for t in meta.tensors}
    back = foveal.load(text, mmproj=mmproj, dtype="float32")
    assert back.config.anyres and back.config.image_grid_pinpoints == vlm.config.image_grid_pinpoints
    for size in [(200, 50), (33, 95)]:
        images = [photo(*size, 2)]
        ids, logits = back.prompt_logits(conversation(images))
        ids_ref, ref = vlm.prompt_logits(conversation(images))
        assert ids == ids_ref
        assert (logits - ref).abs().max().item() <= 1e-4


def test_gguf_mmproj_with_bad_pinpoints_is_refused(folder, tmp_path):
    """A corrupt pinpoint array is a WeightsError naming the key, not a crash later."""
    import gguf
    from foveal.errors import WeightsError
    from foveal.weights.gguf import read_hf_folder, write_gguf
    text, mmproj = write_gguf(read_hf_folder(folder), tmp_path, type="f32")
    reader = gguf.GGUFReader(mmproj)
    bad = tmp_path / "bad-mmproj.gguf"
    writer = gguf.GGUFWriter(bad, arch="clip")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "clip.vision.image_grid_pinpoints":
            value = [32, 64, 48]        # odd length
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(field.name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(field.name, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match="image_grid_pinpoints"):
        foveal.load(text, mmproj=bad, dtype="float32")


def test_plan_counts_the_largest_tiling(folder):
    from foveal.plan import plan
    p = plan(str(folder), device="cpu", memory="8GiB", ctx=256, images=2)
    assert p.image_tokens_per_image == max(foveal.load(folder).config.image_tokens(tuple(x))
                                           for x in tiny.NEXT_PINPOINTS)
    assert any("anyres" in n for n in p.notes)


def test_info_says_what_anyres_is(folder, capsys):
    from foveal.cli import main
    assert main(["info", str(folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "LlavaNextForConditionalGeneration"
    assert d["image_grid_pinpoints"] == tiny.NEXT_PINPOINTS and d["max_image_tokens"] > d["image_tokens_per_image"]


# ---- training (LLaVA-NeXT fine-tuning): the loss and gradients transformers computes ----------------
TRAIN_SIZES = [(45, 37), (200, 50), (20, 61)]      # (w, h): 2x2, 1x3 and 2x1 tile grids (+ a base view each)


def anyres_data(tmp_path, two_images=True):
    """LLaVA-format records whose images differ in size, one record with two images."""
    for i, (w, h) in enumerate(TRAIN_SIZES):
        photo(w, h, 10 + i).save(tmp_path / f"{i}.png")
    records = [{"id": "a", "image": "0.png", "conversations": [
                   {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."},
                   {"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "Small."}]},
               {"id": "b", "image": "1.png", "conversations": [
                   {"from": "human", "value": "How many?\n<image>"}, {"from": "gpt", "value": "Three shapes."}]}]
    if two_images:
        records.append({"id": "c", "image": ["2.png", "0.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No, they differ."}]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    return data


def test_training_loss_and_gradients_match_transformers(folder, tmp_path):
    """A right-padded batch of three records (images of three tile grids, one record with two images):
    the loss equals LlavaNextForConditionalGeneration's with the same labels, and so do the gradients
    of the projector, image_newline, the LM and the vision tower."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    from foveal.train.datasets import ConversationDataset
    from foveal.train.trainer import CausalLMLoss
    data = anyres_data(tmp_path)
    vlm = foveal.load(folder, dtype="float32")
    hf = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    ds = ConversationDataset.from_file(data, vlm, tmp_path)
    b = ds.collate([0, 1, 2])
    assert b["views"] == [5, 4, 3, 5] and b["sizes"] == [(37, 45), (50, 200), (61, 20), (37, 45)]
    n_image = [vlm.config.image_tokens(s) for s in b["sizes"]]
    assert b["image_mask"].sum(1).tolist() == [n_image[0], n_image[1], n_image[2] + n_image[3]]

    vlm.model.requires_grad_(True)
    ours = CausalLMLoss(vlm.model, train_vision=True)(b["input_ids"], b["labels"], b["image_mask"], b["pixels"],
                                                      b["views"], b["sizes"])
    count = int((b["labels"][:, 1:] != -100).sum())
    (ours / count).backward()

    ids = b["input_ids"].masked_fill(b["image_mask"], hf.config.image_token_id)
    images = [Image.open(tmp_path / n).convert("RGB") for n in ("0.png", "1.png", "2.png", "0.png")]
    pix = processor.image_processor(images, return_tensors="pt")
    assert pix["image_sizes"].tolist() == [list(s) for s in b["sizes"]]
    ref = hf(input_ids=ids, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"], labels=b["labels"]).loss
    ref.backward()
    assert abs(ours.item() / count - ref.item()) <= 1e-5 * ref.item()
    theirs = dict(hf.named_parameters())
    for name, p in vlm.model.named_parameters():
        if name in ("multi_modal_projector.linear_1.weight", "image_newline",
                    "language_model.layers.0.mlp.down_proj.weight",
                    "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"):
            g = theirs["model." + name].grad
            assert g is not None and g.abs().max() > 0, name
            assert (p.grad - g).abs().max().item() <= 1e-4 * g.abs().max().item() + 1e-7, name


def test_instruct_fine_tunes_an_anyres_model(folder, tmp_path):
    """Full fine-tuning trains image_newline with the projector and writes a LLaVA-NeXT checkpoint that
    transformers reads with the same logits; LoRA leaves image_newline (not a PEFT module) as it was."""
    from transformers import LlavaNextForConditionalGeneration
    from foveal.train.trainer import TrainConfig, train
    data = anyres_data(tmp_path)
    fast = dict(progress=False, plot=False, precision="fp32", warmup_ratio=0.0, batch_size=3, image_folder=str(tmp_path))
    base = foveal.load(folder, dtype="float32")
    result = train(TrainConfig(stage="instruct", model=str(folder), data=str(data), output_dir=str(tmp_path / "full"),
                               lr_lm=1e-2, lr_projector=1e-2, max_steps=4, **fast))
    assert result.losses[-1] < result.losses[0]
    tuned = foveal.load(tmp_path / "full", dtype="float32")
    assert tuned.config.anyres and tuned.config.image_grid_pinpoints == base.config.image_grid_pinpoints
    assert not torch.equal(tuned.model.image_newline, base.model.image_newline)
    images = [photo(200, 50, 11)]
    ids, logits = tuned.prompt_logits(conversation(images))
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    from transformers import AutoProcessor
    inputs = hf_inputs(AutoProcessor.from_pretrained(tmp_path / "full"), images)
    assert ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        assert (logits - hf(**inputs).logits[0]).abs().max().item() <= 1e-4

    lora = train(TrainConfig(stage="instruct", model=str(folder), data=str(data), output_dir=str(tmp_path / "lora"),
                             lora=True, lora_r=4, lr_lora=1e-2, lr_projector=1e-2, max_steps=2, merge=True, **fast))
    merged = foveal.load(lora.model_dir, dtype="float32")
    assert torch.equal(merged.model.image_newline, base.model.image_newline)
    assert not torch.equal(merged.model.multi_modal_projector.linear_1.weight,
                           base.model.multi_modal_projector.linear_1.weight)


def test_anyres_training_data_errors_name_the_record(folder, tmp_path):
    from foveal.train.datasets import ConversationDataset, DatasetError
    data = anyres_data(tmp_path, two_images=False)
    vlm = foveal.load(folder, dtype="float32")
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=r"record 'b'.*1\.png"):
        ConversationDataset.from_file(data, vlm, tmp_path)
    photo(200, 50, 11).save(tmp_path / "1.png")
    ds = ConversationDataset.from_file(data, vlm, tmp_path)
    photo(50, 200, 11).save(tmp_path / "1.png")       # replaced after reading: its token count is stale
    with pytest.raises(DatasetError, match=r"record 'b'.*now 50x200, it was 200x50"):
        ds.collate([0, 1])
    assert ds.collate([0])["views"] == [5]


def test_served_through_the_ollama_and_openai_clients(models):
    """Behind foveal's real server, the official clients get the model's own answers, and the reported
    image token count is the sum of each image's size-dependent count."""
    import base64
    import io
    import httpx
    ollama = pytest.importorskip("ollama")
    openai = pytest.importorskip("openai")
    from live_server import MODEL, LiveServer
    vlm, hf, processor = models
    wide, tall = photo(200, 50, 1), photo(33, 95, 2)
    blobs = []
    for im in (wide, tall):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        blobs.append(buf.getvalue())
    direct = vlm.generate(conversation([wide, tall], "What is this?"), max_tokens=6, temperature=0)
    expected_tokens = vlm.config.image_tokens((50, 200)) + vlm.config.image_tokens((95, 33))
    with LiveServer(vlm) as server:
        r = ollama.Client(host=server.url).chat(
            model=MODEL, messages=[{"role": "user", "content": "What is this?", "images": blobs}],
            options={"num_predict": 6, "temperature": 0})
        body = httpx.post(server.url + "/api/chat", json={
            "model": MODEL, "stream": False, "options": {"num_predict": 6, "temperature": 0},
            "messages": [{"role": "user", "content": "What is this?",
                          "images": [base64.b64encode(b).decode() for b in blobs]}]}).json()
        show = httpx.post(server.url + "/api/show", json={"model": MODEL}).json()
        uris = ["data:image/png;base64," + base64.b64encode(b).decode() for b in blobs]
        o = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model=MODEL, max_tokens=6, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in uris]
                       + [{"type": "text", "text": "What is this?"}]}])
    assert body["image_token_count"] == expected_tokens and body["image_count"] == 2
    assert r.message.content == body["message"]["content"]
    assert show["model_info"]["vision.image_grid_pinpoints"] == [x for p in tiny.NEXT_PINPOINTS for x in p]
    assert o.usage.prompt_tokens == direct.stats.prompt_tokens
    assert o.choices[0].message.content == direct.text


def test_a_llava_16_model_in_an_ollama_store(folder, models, tmp_path, monkeypatch):
    """`ollama:NAME` with a 1.6 text model + projector layer (what `ollama pull llava:7b` lays out) loads as
    an anyres model and answers like the HF folder (F32 export, greedy)."""
    from foveal.weights.gguf import read_hf_folder, write_gguf
    vlm, hf, processor = models
    text, mmproj = write_gguf(read_hf_folder(folder), tmp_path / "export", type="f32")
    store = tiny.ollama_store(tmp_path / "ollama", "llava", "7b", [(text, "model"), (mmproj, "projector")])
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    pulled = foveal.load("ollama:llava:7b", dtype="float32")
    assert pulled.config.anyres
    messages = conversation([photo(33, 95, 3)], "Name it.")
    assert pulled.generate(messages, max_tokens=8).token_ids == vlm.generate(messages, max_tokens=8).token_ids
