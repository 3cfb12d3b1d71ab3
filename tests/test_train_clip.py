"""`foveal train clip` and `foveal train assemble` on tiny sizes.

What is checked: the CLIP stage lowers its contrastive loss, reports retrieval on a held-out batch,
and writes a tower that transformers' CLIPVisionModel reads with no missing or unexpected
tensor and the same hidden states as foveal's tower; the text encoder is written beside it;
assemble builds a LLaVA (tower + `train lm`'s LM + fresh projector) that foveal and transformers
load with identical greedy answers; a mismatched or token-less input is refused by name.
"""

import json
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file

import foveal
from foveal.cli import main as cli_main
from foveal.errors import ConfigError, FovealError
from foveal.train.cli import cmd_assemble
from foveal.train.clip import RELATION_LABELS, ClipConfig, train_clip, world_tokenizer

TINY_CLIP = dict(image_size=48, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
                 text_layers=1, text_heads=2, embed_dim=16, batch_size=16, eval_size=16, precision="fp32",
                 progress=False)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    report = train_clip(ClipConfig(output_dir=str(out), max_steps=8, lr=3e-3, **TINY_CLIP))
    return out, report


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from foveal.data import text_corpus
    tmp = tmp_path_factory.mktemp("lm")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(text_corpus(30, seed=5)))
    assert cli_main(["train", "lm", str(corpus), "-o", str(tmp / "lm"), "--max-steps", "3", "--seq-len", "64",
                     "--batch-size", "4", "--vocab-size", "320", "--layers", "2", "--hidden-size", "64",
                     "--intermediate-size", "128", "--precision", "fp32", "--no-progress"]) == 0
    return tmp / "lm"


def test_clip_trains_and_reports_retrieval(clip_dir):
    out, report = clip_dir
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
    r = report["retrieval"]
    assert r["candidates"] == 16 and 0.0 <= r["image_to_text_top1"] <= 1.0 and 0.0 <= r["text_to_image_top1"] <= 1.0
    assert json.loads((out / "clip_report.json").read_text())["retrieval"] == r
    assert log[-1]["logit_scale"] != pytest.approx(1 / 0.07, abs=1e-4)     # the temperature is learned


def test_clip_tower_is_a_transformers_clip_vision_model(clip_dir):
    from transformers import CLIPVisionModel
    out, _ = clip_dir
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and config["image_size"] == 48
    keys = set(load_file(out / "model.safetensors"))
    assert keys and all(k.startswith("vision_model.") for k in keys)
    hf, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from foveal.config import vision_config_from_hf
    from foveal.models.vision import VisionTower
    tower = VisionTower(vision_config_from_hf(config), [-1])
    tower.load_state_dict({k.removeprefix("vision_model."): v for k, v in load_file(out / "model.safetensors").items()
                           if not k.startswith("vision_model.post_layernorm.")})
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(tower(pixels)[0], ref, atol=1e-5)
    text = load_file(out / "text_encoder" / "model.safetensors")
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= set(text)
    assert (out / "text_encoder" / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


def test_world_tokenizer_covers_every_caption():
    from tokenizers import Tokenizer

    from foveal.data import generate
    tok = Tokenizer.from_str(world_tokenizer())
    for ex in generate(200, seed=3, images=False):
        for caption in ex.captions:
            assert "<unk>" not in tok.encode(caption).tokens, caption


def test_region_batches_pool_each_objects_patches_and_name_its_phrase():
    from tokenizers import Tokenizer

    from foveal.data import generate
    from foveal.data.language import object_phrase
    from foveal.train.clip import CaptionBatcher
    cfg = ClipConfig(output_dir="unused", region_weight=1.0, **TINY_CLIP)      # 48 px, patch 8: a 6x6 grid
    tok = Tokenizer.from_str(world_tokenizer())
    scenes = [e.scene for e in generate(5, seed=4, config=CaptionBatcher(cfg, tok, 4).world)]
    pool, ids, mask, target = CaptionBatcher(cfg, tok, 4).regions(scenes)
    objects = [(b, o) for b, s in enumerate(scenes) for o in s.objects]
    assert pool.shape == (len(objects), 5 * 36) and torch.allclose(pool.sum(1), torch.ones(len(objects)))
    phrases = [tok.decode([i for i, m in zip(row, keep) if m]) for row, keep in zip(ids.tolist(), mask.tolist())]
    assert len(set(phrases)) == len(phrases)                          # each distinct phrase once
    for r, (b, o) in enumerate(objects):
        touched = pool[r].nonzero().flatten()
        assert all(b * 36 <= i < (b + 1) * 36 for i in touched.tolist())   # only its own image's patches
        x0, y0, x1, y1 = o.bbox
        cx, cy = (x0 + x1) // 2 // 8, (y0 + y1) // 2 // 8                  # the patch under its centre
        assert b * 36 + cy * 6 + cx in touched.tolist()
        assert phrases[target[r]] == object_phrase(o)


def test_clip_with_region_phrases_trains(tmp_path):
    from tokenizers import Tokenizer

    from foveal.train.clip import CaptionBatcher, ClipModel, init_weights
    cfg = ClipConfig(output_dir=str(tmp_path), max_steps=3, lr=3e-3, region_weight=0.5, **TINY_CLIP)
    tok = Tokenizer.from_str(world_tokenizer())
    pixels, ids, mask, _, regions = CaptionBatcher(cfg, tok, 0).batch(0, 6, regions=True)
    model = ClipModel(cfg, tok.get_vocab_size())
    init_weights(model)
    with torch.no_grad():
        plain, logits = model(pixels, ids, mask)
        both, _ = model(pixels, ids, mask, regions)
    assert logits.shape == (6, 6) and both.item() > plain.item()       # the region term is added
    report = train_clip(cfg)
    assert report["steps"] == 3 and json.loads((tmp_path / "train_config.json").read_text())["region_weight"] == 0.5


def test_attribute_and_glyph_regions_name_each_objects_words_and_each_characters_letter():
    from tokenizers import Tokenizer

    from foveal.data import generate
    from foveal.data.render import text_boxes
    from foveal.data.world import CELL_NAMES, COLORS, SHAPES, SIZES, TEXT_ALPHABET
    from foveal.train.clip import CaptionBatcher
    CELLS = [name for row in CELL_NAMES for name in row]
    cfg = ClipConfig(output_dir="unused", attribute_weight=3.0, glyph_weight=0.5, **TINY_CLIP)
    tok = Tokenizer.from_str(world_tokenizer())
    batcher = CaptionBatcher(cfg, tok, 4)
    scenes = [e.scene for e in generate(12, seed=4, config=batcher.world)]
    assert any(s.text for s in scenes)
    pool, _, _, _, *attributes = batcher.regions(scenes)
    assert len(attributes) == 4                                         # shape, colour, size, then the letters
    objects = [o for s in scenes for o in s.objects]

    def words(ids, mask):
        return [tok.decode([i for i, m in zip(row, keep) if m]) for row, keep in zip(ids.tolist(), mask.tolist())]
    for (attr_pool, ids, mask, target, weight), (attr, values) in zip(
            attributes, (("shape", SHAPES), ("color", list(COLORS)), ("size", list(SIZES)))):
        assert attr_pool is pool and weight == 1.0                          # 3.0 shared by three attributes
        names = words(ids, mask)
        assert len(names) == len(values) and all(v in n for v, n in zip(values, names))   # every word, not the batch's
        assert [values[t] for t in target.tolist()] == [getattr(o, attr) for o in objects]
    char_pool, ids, mask, target, weight = attributes[3]
    assert weight == 0.5 and words(ids, mask) == list(TEXT_ALPHABET)
    chars = [(b, box, ch) for b, s in enumerate(scenes) for box, ch in zip(text_boxes(s), s.text or "")]
    assert [TEXT_ALPHABET[t] for t in target.tolist()] == [ch for _, _, ch in chars]
    for row, (b, (x0, y0, x1, y1), _) in zip(char_pool, chars):
        touched = row.nonzero().flatten().tolist()
        assert abs(row.sum().item() - 1.0) < 1e-6 and all(b * 36 <= i < (b + 1) * 36 for i in touched)
        cx, cy = (x0 + x1 - 1) // 2 // 8, (y0 + y1 - 1) // 2 // 8          # the patch under the glyph's centre
        assert b * 36 + cy * 6 + cx in touched


def test_attribute_loss_is_cross_entropy_over_each_attributes_words_and_weights_add_up():
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from foveal.train.clip import CaptionBatcher, ClipModel, init_weights
    tok = Tokenizer.from_str(world_tokenizer())
    cfg = ClipConfig(output_dir="unused", attribute_weight=3.0, caption_weight=0.0, **TINY_CLIP)
    pixels, ids, mask, _, regions = CaptionBatcher(cfg, tok, 0).batch(0, 6, regions=True)
    model = ClipModel(cfg, tok.get_vocab_size())
    init_weights(model)
    model.region_weight = 0.0
    with torch.no_grad():
        loss, _ = model(pixels, ids, mask, regions)
        pool, attributes = regions[0], regions[4:]
        states = model.vision_model(pixels)[0][:, 1:]
        region = model._embed(pool @ states.reshape(-1, states.shape[-1]))
        scale = model.logit_scale.exp()
        expected = sum(F.cross_entropy(scale * region @ model.encode_text(i, m).t(), t) for _, i, m, t, _ in attributes)
        assert torch.allclose(loss, expected, rtol=1e-5)                 # 3.0 / 3 per attribute, nothing else
        model.caption_weight = 1.0
        with_captions, logits = model(pixels, ids, mask, regions)
        target = torch.arange(6)
        caption = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        assert torch.allclose(with_captions, loss + caption, rtol=1e-5)


def _inside(scene, grid=6, patch=8):
    """(patch index, object) for every patch whose centre lies in an object's box, in object order."""
    return [(r * grid + c, o) for o in scene.objects for r in range(grid) for c in range(grid)
            if o.bbox[0] <= c * patch + patch / 2 <= o.bbox[2] and o.bbox[1] <= r * patch + patch / 2 <= o.bbox[3]]


def test_patch_pooled_attribute_words_and_dense_labels_name_the_object_under_each_patch():
    from tokenizers import Tokenizer

    from foveal.data import generate
    from foveal.data.render import text_boxes
    from foveal.data.world import CELL_NAMES, COLORS, SHAPES, SIZES, TEXT_ALPHABET
    from foveal.train.clip import CaptionBatcher
    CELLS = [name for row in CELL_NAMES for name in row]
    cfg = ClipConfig(output_dir="unused", attribute_weight=3.0, attribute_pooling="patch", label_weight=2.0,
                     **TINY_CLIP)
    batcher = CaptionBatcher(cfg, Tokenizer.from_str(world_tokenizer()), 4)
    scenes = [e.scene for e in generate(12, seed=4, config=batcher.world)]
    pool, _, _, _, *attributes = batcher.regions(scenes)
    labels = attributes.pop()
    expected = [(b * 36 + j, o) for b, s in enumerate(scenes) for j, o in _inside(s)]
    assert len(expected) >= sum(len(s.objects) for s in scenes)      # every object has a patch centre inside it
    values = {"shape": SHAPES, "color": list(COLORS), "size": list(SIZES)}
    for (attr_pool, _, _, target, weight), attr in zip(attributes, values):
        assert attr_pool is not pool and weight == 1.0
        assert attr_pool.shape == (len(expected), 12 * 36)
        assert [row.nonzero().flatten().tolist() for row in attr_pool] == [[j] for j, _ in expected]
        assert [values[attr][t] for t in target.tolist()] == [getattr(o, attr) for _, o in expected]
    assert labels["weight"] == 2.0 and list(labels["targets"]) == ["shape", "color", "size", "char"]
    for attr in values:
        label_pool, target = labels["targets"][attr]
        assert torch.equal(label_pool, attributes[0][0])
        assert [values[attr][t] for t in target.tolist()] == [getattr(o, attr) for _, o in expected]
    glyph_pool, target = labels["targets"]["char"]          # every patch whose centre is inside a character
    chars = [(b * 36 + r * 6 + c, ch) for b, s in enumerate(scenes)
             for (x0, y0, x1, y1), ch in zip(text_boxes(s), s.text or "")
             for r in range(6) for c in range(6) if x0 <= c * 8 + 4 <= x1 - 1 and y0 <= r * 8 + 4 <= y1 - 1]
    assert len(chars) >= sum(len(s.text or "") for s in scenes)
    assert [row.nonzero().flatten().tolist() for row in glyph_pool] == [[j] for j, _ in chars]
    assert [TEXT_ALPHABET[t] for t in target.tolist()] == [ch for _, ch in chars]
    batcher.cfg = ClipConfig(output_dir="unused", label_weight=2.0, label_chars=False, **TINY_CLIP)
    assert list(batcher.regions(scenes)[-1]["targets"]) == ["shape", "color", "size"]
    # with label_cells, every patch inside an object also names the object's grid cell ("top left", ...)
    batcher.cfg = ClipConfig(output_dir="unused", label_weight=2.0, label_chars=False, label_cells=True, **TINY_CLIP)
    targets = batcher.regions(scenes)[-1]["targets"]
    assert list(targets) == ["shape", "color", "size", "cell"]
    cell_pool, target = targets["cell"]
    assert torch.equal(cell_pool, attributes[0][0])
    assert [CELLS[t] for t in target.tolist()] == [o.cell for _, o in expected]
    # with label_relations, each such patch names per direction the kinds of object lying that way from its object
    batcher.cfg = ClipConfig(output_dir="unused", label_weight=2.0, label_chars=False, label_relations=True,
                             **TINY_CLIP)
    targets = batcher.regions(scenes)[-1]["targets"]
    assert list(targets) == ["shape", "color", "size", "relation"]
    relation_pool, target = targets["relation"]
    assert torch.equal(relation_pool, attributes[0][0]) and target.dtype == torch.float32
    assert target.shape == (len(expected), 4 * (len(SHAPES) + len(COLORS) * len(SHAPES)))
    scene_of = {id(o): s for s in scenes for o in s.objects}
    for row, (_, o) in zip(target, expected):
        named = {RELATION_LABELS[i] for i in row.nonzero().flatten().tolist()}
        truth = set()
        for other in scene_of[id(o)].objects:
            ways = {"left": other.col > o.col, "right": other.col < o.col, "above": other.row > o.row,
                    "below": other.row < o.row}
            truth |= {(way, kind) for way, yes in ways.items() if yes
                      for kind in (other.shape, f"{other.color} {other.shape}")}
        assert named == truth
    assert any(target.sum(1) > 0) and any(target.sum(1) == 0)      # some objects have neighbours, some none


def test_dense_label_loss_is_the_heads_cross_entropy_and_trains_without_captions(tmp_path):
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from foveal.train.clip import CaptionBatcher, ClipModel, init_weights
    tok = Tokenizer.from_str(world_tokenizer())
    cfg = ClipConfig(output_dir="unused", label_weight=3.0, caption_weight=0.0, region_weight=0.0, label_cells=True,
                     **TINY_CLIP)
    pixels, ids, mask, _, regions = CaptionBatcher(cfg, tok, 0).batch(0, 6, regions=True)
    model = ClipModel(cfg, tok.get_vocab_size())
    init_weights(model)
    assert model.label_heads["cell"].out_features == 9
    with torch.no_grad():
        loss, _ = model(pixels, ids, mask, list(regions))
        labels = regions[-1]
        assert list(labels["targets"]) == ["shape", "color", "size", "cell", "char"]     # these scenes have text
        states = model.vision_model(pixels)[0][:, 1:].reshape(-1, cfg.vision_width)
        expected = sum(F.cross_entropy(model.label_heads[a](model.post_layernorm(pool @ states)), t)
                       for a, (pool, t) in labels["targets"].items())
        assert torch.allclose(loss, 3.0 / 5 * expected, rtol=1e-5)          # the heads' terms averaged, times 3
    # the relation head: binary cross-entropy per (direction, kind), summed over kinds, averaged over the four
    # directions and the patches, on top of the other heads' average (whose weight it leaves as it was)
    cfg.label_relations = True
    batcher = CaptionBatcher(cfg, tok, 0)
    pixels, ids, mask, _, regions = batcher.batch(0, 6, regions=True)
    model = ClipModel(cfg, tok.get_vocab_size())
    init_weights(model)
    with torch.no_grad():
        loss, _ = model(pixels, ids, mask, list(regions))
        labels = regions[-1]
        states = model.vision_model(pixels)[0][:, 1:].reshape(-1, cfg.vision_width)
        single = sum(F.cross_entropy(model.label_heads[a](model.post_layernorm(pool @ states)), t)
                     for a, (pool, t) in labels["targets"].items() if a != "relation")
        pool, target = labels["targets"]["relation"]
        logits = model.label_heads["relation"](model.post_layernorm(pool @ states))
        by_hand = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).sum() / len(target) / 4
        assert torch.allclose(loss, 3.0 / 5 * (single + by_hand), rtol=1e-5)
    report = train_clip(ClipConfig(output_dir=str(tmp_path), max_steps=6, lr=3e-3, label_weight=3.0,
                                   caption_weight=0.0, region_weight=0.0, **TINY_CLIP))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert report["steps"] == 6 and log[-1]["loss"] < log[0]["loss"]
    assert not any(k.startswith("vision_model.label") or "head" in k for k in load_file(tmp_path / "model.safetensors"))


def test_assemble_builds_a_llava_that_transformers_answers_the_same(clip_dir, lm_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from foveal.data import generate
    out = tmp_path / "vlm"
    assert cli_main(["train", "assemble", "--vision", str(clip_dir[0]), "--lm", str(lm_dir), "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] == 4
    assert config["vision_feature_layer"] == -1 and config["image_seq_length"] == 36
    ours = foveal.load(out, dtype="float32")
    lm = foveal.load(lm_dir, dtype="float32")
    # the LM's weights came over unchanged
    for name, p in lm.model.language_model.state_dict().items():
        if ".kv_cache." not in name:
            assert torch.equal(p, ours.model.language_model.state_dict()[name]), name
    image = next(generate(1, seed=9, config=None)).image.resize((48, 48))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "How many shapes are there?"}]}]
    from foveal.processing.images import preprocess_batch
    from foveal.processing.prompt import normalize_messages
    template_messages, _ = normalize_messages(messages, ours.prompt.template)
    inputs = ours.prompt.build(template_messages, n_images=1)
    ids = torch.tensor([inputs.input_ids])
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          pixel_values=preprocess_batch([image], ours.image_config), max_new_tokens=8,
                          do_sample=False)[0, ids.shape[1]:].tolist()
    eos = set(ours.engine.eos_ids)
    ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert ours.generate(messages, max_tokens=8).token_ids == ref


def test_assemble_refuses_bad_inputs(clip_dir, lm_dir, tmp_path):
    from foveal.train.assemble import assemble
    with pytest.raises(FovealError, match="clip_vision_model"):
        assemble(clip_dir[0], clip_dir[0], tmp_path / "o1")       # a vision tower is no language model
    bad = tmp_path / "lm"
    bad.mkdir()
    for f in lm_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image>"]
    tok["model"]["vocab"].pop("<image>")
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="no <image> token"):
        assemble(clip_dir[0], bad, tmp_path / "o2")


def test_assemble_calibrates_the_projector_on_images(clip_dir, lm_dir, tmp_path):
    """--calibrate: the projector's first layer reads standardised features (its output on the
    calibration images equals the original weight applied to (features - mean) / std) and the
    image tokens come out at the norm of the LM's token embeddings."""
    from foveal.data import generate
    from foveal.processing.images import preprocess_batch
    images = tmp_path / "images"
    images.mkdir()
    for i, ex in enumerate(generate(12, seed=4, config=None)):
        ex.image.resize((48, 48)).save(images / f"{i:03d}.png")
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    assert cli_main(["train", "assemble", "--vision", str(clip_dir[0]), "--lm", str(lm_dir), "-o", str(plain)]) == 0
    assert cli_main(["train", "assemble", "--vision", str(clip_dir[0]), "--lm", str(lm_dir), "-o", str(calibrated),
                     "--calibrate", str(images)]) == 0
    a, b = foveal.load(plain, dtype="float32"), foveal.load(calibrated, dtype="float32")
    from PIL import Image
    pixels = preprocess_batch([Image.open(p) for p in sorted(images.iterdir())], b.image_config)
    with torch.no_grad():
        features = a.model.image_features(pixels)
        flat = features.reshape(-1, features.shape[-1])
        standardised = (flat - flat.mean(0)) / flat.std(0)
        expected = standardised @ a.model.multi_modal_projector.linear_1.weight.T
        got = b.model.multi_modal_projector.linear_1(flat)
        assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
        token_norm = b.model.language_model.embed_tokens.weight.norm(dim=-1).mean()
        image_norm = b.model.encode_images(pixels).norm(dim=-1).mean()
        assert image_norm == pytest.approx(token_norm.item(), rel=1e-3)
        # the second layer is only rescaled, and the tower and the LM are untouched
        ratio = b.model.multi_modal_projector.linear_2.weight / a.model.multi_modal_projector.linear_2.weight
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
        for part in ("vision_tower", "language_model"):
            for (name, p), q in zip(getattr(a.model, part).state_dict().items(), getattr(b.model, part).state_dict().values()):
                assert torch.equal(p, q), name
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no .png"):
        cmd_assemble(Namespace(vision=str(clip_dir[0]), lm=str(lm_dir), output=str(tmp_path / "o"),
                               vision_feature_layer=-1, seed=0, calibrate=str(empty)))


def test_negative_nan_or_all_zero_loss_weights_are_refused():
    for weights in ({"caption_weight": -1.0}, {"caption_weight": 0.0}, {"attribute_weight": float("nan")},
                    {"label_weight": -0.5}):
        with pytest.raises(ConfigError, match="loss weights"):
            ClipConfig(output_dir="unused", **weights)
    with pytest.raises(ConfigError, match="attribute-pooling must be 'region' or 'patch'"):
        ClipConfig(output_dir="unused", attribute_pooling="pixel")


def test_recipe_stage_options_override_a_stages_settings_and_bad_ones_are_refused_by_name(tmp_path):
    from foveal.train.cli import stage_options
    assert stage_options(["clip.attribute_weight=3", "clip.lr=3e-3", "instruct.batch_size=16", "lm.precision=fp32"]) == {
        "clip": {"attribute_weight": 3, "lr": 0.003}, "instruct": {"batch_size": 16}, "lm": {"precision": "fp32"}}
    for bad, words in (("clip.lr", "STAGE.KEY=VALUE"), ("lr=3", "STAGE.KEY=VALUE"),
                       ("eval.lr=1", "unknown stage 'eval'"), ("clip.atribute_weight=3", "no setting 'atribute_weight'"),
                       ("align.output_dir=/x", "no setting 'output_dir'")):
        with pytest.raises(ConfigError, match=words):
            stage_options([bad])
    # the recipe hands them to the stage over its own settings (here the data and CLIP stages alone)
    from foveal.train.recipe import PLAIN_INSTRUCT, RecipeConfig, _options, run_recipe
    cfg = RecipeConfig(output_dir="unused", extra=stage_options(["instruct.batch_size=16", "align.lr_projector=2e-3"]))
    assert _options(cfg, "instruct", stage="instruct", batch_size=8, seed=0) == {"stage": "instruct", "batch_size": 16,
                                                                                 "seed": 0}
    assert _options(cfg, "align", stage="align", lr_projector=1e-3) == {"stage": "align", "lr_projector": 2e-3}
    out = tmp_path / "recipe"
    run_recipe(RecipeConfig(output_dir=str(out), minutes=0.2, train_scenes=16, eval_scenes=1, progress=False,
                            stages=("data", "clip"), extra=stage_options(
                                ["clip.batch_size=8", "clip.attribute_weight=2.5", "clip.max_steps=2"])))
    written = json.loads((out / "clip" / "train_config.json").read_text())
    assert (written["batch_size"], written["attribute_weight"], written["max_steps"]) == (8, 2.5, 2)
    recipe = RecipeConfig(output_dir="unused")                   # the recipe's own values where none is given
    assert (written["label_weight"], written["caption_weight"], written["lr"]) == (
        recipe.clip_label_weight, recipe.clip_caption_weight, recipe.clip_lr)
    assert written["region_weight"] == recipe.clip_region_weight and written["label_weight"] > 0
    assert (written["label_chars"], written["label_cells"], written["label_relations"]) == (
        recipe.clip_label_chars, recipe.clip_label_cells, recipe.clip_label_relations)
    manifest = json.loads((out / "data" / "train" / "dataset.json").read_text())
    # on by default in stage 2's records, off in the LM's documents; the bare records written beside them
    assert manifest["relation_thoughts"] is recipe.relation_thoughts is True
    assert manifest["document_thoughts"] is recipe.document_thoughts is False
    assert "<think>" in (out / "data" / "train" / "llava_instruct.json").read_text()
    assert "<think>" not in (out / "data" / "train" / "corpus.jsonl").read_text()
    assert "<think>" not in (out / "data" / "train" / PLAIN_INSTRUCT).read_text()
    from foveal.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["train", "recipe", "shapes", "-o", "x"]).relation_thoughts is None      # None: the recipe's
    assert parse(["train", "recipe", "shapes", "-o", "x", "--no-relation-thoughts"]).relation_thoughts is False
    assert parse(["train", "recipe", "shapes", "-o", "x", "--document-thoughts"]).document_thoughts is True
    run_recipe(RecipeConfig(output_dir=str(tmp_path / "rel"), minutes=0.2, train_scenes=16, eval_scenes=1,
                            progress=False, stages=("data",), document_thoughts=True))
    assert "<think>" in (tmp_path / "rel" / "data" / "train" / "llava_instruct.json").read_text()
    assert "<think>" in (tmp_path / "rel" / "data" / "train" / "corpus.jsonl").read_text()
    assert "<think>" not in (tmp_path / "rel" / "data" / "heldout" / "vqa_annotations.json").read_text()
    assert stage_options(["dense.lr=2e-3", "dense.cells=false"]) == {"dense": {"lr": 2e-3, "cells": False}}
    with pytest.raises(ConfigError, match="dense-share"):
        RecipeConfig(output_dir="unused", dense_share=1.5)
    assert cli_main(["train", "recipe", "shapes", "-o", str(tmp_path / "x"), "--dense-share", "-1"]) != 0
    assert cli_main(["train", "recipe", "shapes", "-o", str(tmp_path / "x"), "--stage-option", "clip.nope=1"]) != 0
    assert not (tmp_path / "x").exists()                         # refused before anything ran


def test_recipe_can_train_stage_2_on_bare_relation_answers_first_then_on_thoughts(tmp_path):
    """--plain-first-share: stage 2 runs twice, first on the records with bare relation answers at its own
    learning rates, then from that model on the records with thoughts at thoughts_lr_scale of them.
    --no-document-thoughts: the LM's scene documents keep bare relation answers."""
    from foveal.engine.thinking import split_thinking
    from foveal.train.recipe import PLAIN_INSTRUCT, RecipeConfig, run_recipe
    out = tmp_path / "recipe"
    cfg = RecipeConfig(output_dir=str(out), minutes=0.3, train_scenes=16, eval_scenes=1, progress=False,
                       relation_thoughts=True, document_thoughts=False, plain_first_share=0.5,
                       vision_width=32, vision_layers=1,
                       lm_hidden=64, lm_intermediate=96, lm_layers=1, vocab_size=320,
                       stages=("data", "clip", "lm", "assemble", "align", "instruct"),
                       extra={"clip": {"max_steps": 2}, "lm": {"max_steps": 2}, "align": {"max_steps": 2, "batch_size": 8},
                              "instruct": {"max_steps": 2}})
    summary = run_recipe(cfg)
    assert {"instruct-plain", "instruct"} <= set(summary["stages"])
    data = out / "data" / "train"
    plain, thought = (json.loads((data / name).read_text()) for name in (PLAIN_INSTRUCT, "llava_instruct.json"))
    assert len(plain) == len(thought) == 16
    thoughts = 0
    for p, t in zip(plain, thought):                        # the same turns; only relation answers differ
        assert (p["image"], [x["value"] for x in p["conversations"] if x["from"] == "human"]) == (
            t["image"], [x["value"] for x in t["conversations"] if x["from"] == "human"])
        for pa, ta in zip(p["conversations"][1::2], t["conversations"][1::2]):
            thinking, answer = split_thinking(ta["value"])
            assert pa["value"] == answer and "<think>" not in pa["value"]
            thoughts += bool(thinking)
    assert thoughts > 0
    documents = (data / "corpus.jsonl").read_text()
    assert "column" not in documents and "<think>" not in documents and documents.count("\n") == 16
    assert json.loads((data / "dataset.json").read_text())["document_thoughts"] is False
    first, second = (json.loads((out / d / "train_config.json").read_text()) for d in ("instruct-plain", "instruct"))
    assert (first["model"], first["data"]) == (str(out / "align"), str(data / PLAIN_INSTRUCT))
    assert (second["model"], second["data"]) == (str(out / "instruct-plain"), str(data / "llava_instruct.json"))
    assert (first["lr_lm"], first["lr_projector"], first["lr_vision"]) == (cfg.lr_lm, cfg.lr_projector, cfg.lr_vision)
    for key in ("lr_lm", "lr_projector", "lr_vision"):
        assert second[key] == pytest.approx(first[key] * cfg.thoughts_lr_scale)
    assert (out / "model" / "model.safetensors").exists()
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="plain-first-share"):
            RecipeConfig(output_dir="unused", plain_first_share=bad)
    assert cli_main(["train", "recipe", "shapes", "-o", str(tmp_path / "x"), "--plain-first-share", "2"]) != 0
    assert not (tmp_path / "x").exists()
    from foveal.cli import build_parser
    assert build_parser().parse_args(["train", "recipe", "shapes", "-o", "x", "--plain-first-share", "0.6"]
                                     ).plain_first_share == 0.6
    assert build_parser().parse_args(["train", "recipe", "shapes", "-o", "x", "--relation-thoughts",
                                      "--no-document-thoughts"]).document_thoughts is False


def test_train_clip_command_takes_the_dense_options(tmp_path):
    argv = ["train", "clip", "-o", str(tmp_path), "--image-size", "48", "--width", "32", "--layers", "1",
            "--heads", "2", "--text-width", "32", "--text-layers", "1", "--embed-dim", "16", "--batch-size", "8",
            "--max-steps", "2", "--eval-size", "8", "--precision", "fp32", "--no-progress",
            "--attribute-weight", "1", "--label-weight", "2", "--no-label-chars", "--label-cells",
            "--label-relations", "--attribute-pooling", "patch"]
    assert cli_main(argv) == 0
    written = json.loads((tmp_path / "train_config.json").read_text())
    assert (written["attribute_pooling"], written["label_weight"], written["attribute_weight"]) == ("patch", 2.0, 1.0)
    assert written["label_chars"] is False and written["label_cells"] is True and written["label_relations"] is True
    with pytest.raises(SystemExit):
        cli_main(argv[:-2] + ["--attribute-pooling", "pixels"])


def test_dense_targets_name_each_patchs_object_words_and_characters():
    from foveal.data import WorldConfig, generate
    from foveal.data.render import text_boxes
    from foveal.train.dense import patch_word_targets
    scenes = [e.scene for e in generate(10, seed=4, config=WorldConfig(image_size=48))]
    assert any(s.text for s in scenes)
    encode = lambda text: [ord(ch) for ch in text]             # a stand-in tokenizer: one id per character
    rows, targets = patch_word_targets(scenes, encode, grid=6, cells=True, chars=True)
    expected = [(b * 36 + j, [ord(ch) for w in (o.size, o.color, o.shape, *o.cell.split()) for ch in " " + w])
                for b, s in enumerate(scenes) for j, o in _inside(s)]
    chars = [(b * 36 + r * 6 + c, [ord(ch)]) for b, s in enumerate(scenes)
             for (x0, y0, x1, y1), ch in zip(text_boxes(s), s.text or "")
             for r in range(6) for c in range(6) if x0 <= c * 8 + 4 <= x1 - 1 and y0 <= r * 8 + 4 <= y1 - 1]
    got = list(zip(rows, targets))
    assert sorted(got) == sorted(expected + chars)
    rows, targets = patch_word_targets(scenes, encode, grid=6, cells=False, chars=False)
    assert list(zip(rows, targets)) == [(j, t[:len(t) - sum(len(" " + w) for w in o.cell.split())])
                                        for (j, t), (_, o) in zip(expected, [x for s in scenes for x in _inside(s)])]


def test_dense_align_moves_only_the_projector_toward_the_object_words(clip_dir, lm_dir, tmp_path):
    from foveal.data import WorldConfig, generate
    from foveal.processing.images import preprocess_batch
    from foveal.train.dense import DenseAlignConfig, dense_align, dense_loss, patch_word_targets
    assembled = tmp_path / "vlm"
    assert cli_main(["train", "assemble", "--vision", str(clip_dir[0]), "--lm", str(lm_dir), "-o", str(assembled)]) == 0
    report = dense_align(DenseAlignConfig(model=str(assembled), output_dir=str(tmp_path / "dense"), minutes=None,
                                          max_steps=12, batch_size=8, lr=3e-3, seed=1, progress=False))
    assert report["steps"] == 12 and json.loads((tmp_path / "dense" / "dense_report.json").read_text())["steps"] == 12
    before, after = load_file(assembled / "model.safetensors"), load_file(tmp_path / "dense" / "model.safetensors")
    assert set(before) == set(after)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("multi_modal_projector.") for k in moved)
    # the dense loss on scenes of another seed is lower after than before
    losses = []
    for folder in (assembled, tmp_path / "dense"):
        vlm = foveal.load(folder, dtype="float32")
        examples = list(generate(16, seed=99, config=WorldConfig(image_size=48)))
        rows, targets = patch_word_targets([e.scene for e in examples],
                                           lambda t: vlm.tokenizer.tok.encode(t, add_special_tokens=False).ids, 6)
        with torch.no_grad():
            losses.append(float(dense_loss(vlm.model, preprocess_batch([e.image for e in examples], vlm.image_config),
                                           rows, targets)))
    assert losses[1] < losses[0]
    for bad in ({"minutes": 0}, {"max_steps": 0}, {"lr": 0.0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            DenseAlignConfig(model="m", output_dir="o", **bad)
