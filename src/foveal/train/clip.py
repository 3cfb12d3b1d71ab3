"""`foveal train clip`: contrastive (CLIP) pretraining of a ViT image encoder and a small text
encoder on the shapes world's image-caption pairs.

Mirrors CLIP (Radford et al. 2021; transformers' `CLIPModel.forward` loss): both encoders map
into one embedding space, the logits are cosine similarities times a learned temperature
`logit_scale` (initialised to log(1/0.07), clamped at log(100)), and the loss is the mean of
image->text and text->image cross-entropy over the batch (symmetric InfoNCE).

Design decisions:
- The image encoder is foveal's `VisionTower` (CLIP ViT: class token, pre-layernorm, quick-GELU),
  so the trained weights are a CLIP vision tower by construction and are written in transformers'
  `CLIPVisionModel` layout (`config.json` with model_type `clip_vision_model`, tensors named
  `vision_model.*`): the folder is what `foveal train assemble --vision` and any LLaVA take.
- The image embedding is the mean of the last layer's patch states (not the class token): with a
  class-token pool, the last layer's patch outputs get no gradient at all, and those are the
  features a LLaVA built on this tower reads (`vision_feature_layer: -1`).
- The text encoder is a few pre-norm transformer layers over a word-level tokenizer of the
  world's closed vocabulary (`world_words()`; rendered text is split into its characters),
  mean-pooled over real tokens. Word tokens keep a caption at ~30 tokens instead of ~110 bytes:
  the text side then costs little next to the image side on a CPU. It is written to
  `text_encoder/` beside the tower (with both projections, `logit_scale` and tokenizer.json).
- Data is generated on the fly from the world seed: batch k holds scenes k*B .. k*B+B-1, so a
  run is reproducible and never sees an image twice. Each image is paired with one of its caption
  styles (the canonical one half of the time: it names sizes, positions and text, which is what
  the tower must learn to see). Retrieval is measured on a held-out batch from another seed,
  with canonical captions.
- Region-phrase contrast (`region_weight`, after RegionCLIP / GLIP's region-word alignment):
  besides the whole image against its caption, the patches under each object (mean of the last
  layer's patch states under its box, through the same layernorm and projection) are contrasted
  with the distinct object phrases of the batch ("small red circle", ...), and the two losses
  are added. With whole-image captions only, in-batch negatives are told apart by colour and
  position, so the tower learnt colour and barely shape: a linear probe on the patches under an
  object read its colour at 99.9 % but its shape (6 classes) at ~50 %, and a LLaVA cannot name
  what its tower does not encode. (Hard-negative captions with one shape changed, NegCLIP-style,
  were tried first: in the same 5.5 minutes retrieval fell to 3.5 % and the shape probe to 46 %.)
- Region-attribute contrast (`attribute_weight`, region-word alignment as in GLIP): the same
  object regions are also contrasted, one attribute at a time, with every word of that
  attribute ("circle" among the 6 shapes, "red object" among the 8 colours, "small object"
  among the 3 sizes), each through the text encoder. Phrase negatives come from the batch, so
  an object's phrase is usually told from the others by colour or size; the attribute words
  always pit a shape against all the other shapes. Measured with the tower's linear probe
  (6,200 objects of an unseen seed, 5.5 minutes each, batch 64, lr 3e-3): region phrases alone
  read shape at 60 %; with attribute words (weight 3) 68 %; with the whole-image caption loss
  also turned down to 0.2 (`caption_weight`), 84 % (size 98 %, retrieval 62 % instead of 75 %).
  A supervised upper bound (linear heads instead of words, 3 minutes) reads 93.5 %.
  `glyph_weight` does the same for each rendered character's patches against the alphabet
  (off by default: at 0.5 it pulled the shape probe down to 72 % in the same run).
  Batch 64 at lr 3e-3 rather than the default 128 at 1e-3 for these: twice the steps in the
  same minutes (the supervised heads' own held-out shape accuracy: 86 % vs 59 % in 3 minutes).
  The same seed and settings gave a 69 % probe in another run (the time-based schedule makes
  runs differ), and a whole recipe with them a model no better than without (README), so the
  recipe keeps the defaults.
- What a LLaVA reads is one patch at a time: its attention takes weighted means of single patch
  states, and a question about "the red object" needs the shape in the red patches themselves.
  Measured with a linear probe on single patches (a patch whose centre lies inside an object ->
  that object's shape; 17,787 patches of an unseen seed), the towers trained with the losses above
  read shape at 44-46 % per patch (the 62.7 % recipe's tower: 44 %; attribute words at weight 3 over
  each object's patches, `attribute_pooling="patch"`: 46 % in 4 minutes on one thread; the text
  encoder learns the words' embeddings as slowly as the tower learns shapes).
- Dense scene labels (`label_weight`): the synthetic world knows what lies under every patch, so
  linear heads on every patch inside an object (after `post_layernorm`) name that object's shape,
  colour and size, and on every patch inside a rendered character name the character
  (cross-entropy, the heads' terms averaged, times the weight), beside the contrastive
  losses, as SigLIP 2 and LocCa add dense and captioning objectives to a contrastive encoder. The
  heads are not saved: the tower and the text encoder are written as before. In the
  recipe's CLIP stage (8.25 minutes, 2 threads, batch 64, lr 3e-3, caption weight 0.2, no region
  phrases) the per-patch shape probe read 92.6 % (size 93.3 %, colour 99.0 %), and whole-image
  retrieval rose too (73.4 % / 75.4 % top-1 against 40 % / 46 % for the 62.7 % recipe's tower).
- `label_cells` adds a head naming the grid cell of the object under each patch (what "where is
  the X?" answers): the recipe's tower read the cell from single patches at 45.8 %, and with the
  head at 100 % (shape 99.9 %). Whole runs with it answered "where" 53 % instead of 48 % and read
  text better, but their image tokens came to carry mostly the cell and POPE and shape fell
  (README). Off by default here; the recipe turns it on since its LM learnt to look objects up in
  its context (scene documents), with which the head raised "where" from 73 % to 96 %.
- `label_relations` adds a multi-label head: per patch inside an object, for each direction (left,
  right, above, below) and each shape and colour + shape, whether an object of that kind lies that
  way (by grid column / row, as relation questions compare). A relation question ("Is the circle
  left of the square?") then asks about one property of the circle's patches, as an existence
  question asks about one patch's colour and shape, instead of a comparison of two looked-up
  places, which the recipe's 4-layer LM did not learn with the thought's first ending (README,
  "Relation thoughts"; it does with "is x less than y?": "Relations: one comparison"). Its term
  comes on top of the other heads' average, binary cross-entropy summed over a direction's kinds.
  Measured in a whole recipe run it did not help: the stage's loss ended at 1.85 (0.04 without
  the head; the head's term alone would be 4.5 at the label priors), retrieval fell from 88 % to
  64 %, and the model answered colour, shape and "where" at ~55 % and relations at chance
  (README). Off in the recipe.
- Preprocessing is the same `CLIPImageProcessor` arithmetic inference uses (`preprocess_batch`),
  and `preprocessor_config.json` is written with the tower.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from ..data.language import RELATIONS
from ..errors import ConfigError
from ..models.vision import VisionTower

EVAL_SEED_OFFSET = 7919  # the held-out retrieval batch's world seed is seed + this


def _attributes() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(attribute, its values) of a world object: what attribute words and label heads name."""
    from ..data.world import COLORS, SHAPES, SIZES
    return (("shape", SHAPES), ("color", tuple(COLORS)), ("size", tuple(SIZES)))


@dataclass
class ClipConfig:
    output_dir: str
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_len: int = 64
    embed_dim: int = 128
    batch_size: int = 128
    max_steps: int = 300
    minutes: float | None = None        # time budget: the schedule decays by time too and ends with it
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    precision: str = "auto"
    seed: int = 0
    eval_size: int = 256
    region_weight: float = 0.0          # weight of the region-phrase loss (0: whole images only; see above)
    attribute_weight: float = 0.0       # weight of the region-attribute-word loss (see above)
    caption_weight: float = 1.0         # weight of the whole-image caption loss
    glyph_weight: float = 0.0           # weight of the rendered-character-vs-alphabet loss (see above)
    attribute_pooling: str = "region"   # attribute words against each object's mean ("region") or each of its patches
    label_weight: float = 0.0           # weight of the dense scene-label loss (linear heads on patches, see above)
    label_chars: bool = True            # ... with a head naming the character under each glyph patch
    label_cells: bool = False           # ... and one naming the grid cell ("top left", ...) of the object under each patch
    label_relations: bool = False       # ... and, per direction, the kinds of object lying that way (multi-label)
    progress: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image-size {self.image_size} must be a multiple of patch-size {self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ConfigError("widths must divide by their head counts")
        weights = {"region": self.region_weight, "attribute": self.attribute_weight,
                   "caption": self.caption_weight, "glyph": self.glyph_weight, "label": self.label_weight}
        if any(not w >= 0 for w in weights.values()) or not any(weights.values()):
            raise ConfigError(f"loss weights must be >= 0 and not all 0; got {weights}")
        if self.batch_size < 2:
            raise ConfigError("contrastive training needs batch-size >= 2")
        if self.attribute_pooling not in ("region", "patch"):
            raise ConfigError(f"attribute-pooling must be 'region' or 'patch', got {self.attribute_pooling!r}")
        if self.max_steps < 1:
            raise ConfigError(f"max-steps must be >= 1, got {self.max_steps}")


def vision_config(cfg: ClipConfig) -> VisionConfig:
    return VisionConfig(model_type="clip_vision_model", hidden_size=cfg.vision_width,
                        intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
                        patch_size=cfg.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def image_processor_config(image_size: int) -> dict:
    from ..processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": image_size},
            "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
            "do_resize": True, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255,
            "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3}


class TextEncoder(nn.Module):
    """Token + position embeddings -> pre-norm transformer layers -> mean over real tokens."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_len, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) -> pooled (B, width); mask is True at real tokens."""
        x = self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]   # (B, T, W)
        x = self.final_layer_norm(self.layers(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig, vocab_size: int):
        super().__init__()
        self.vision_cfg = vision_config(cfg)
        self.vision_model = VisionTower(self.vision_cfg, [-1])
        self.post_layernorm = nn.LayerNorm(cfg.vision_width, eps=1e-5)
        self.text_model = TextEncoder(vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_max_len)
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.region_weight = cfg.region_weight
        self.caption_weight = cfg.caption_weight
        if cfg.label_weight > 0:        # dense scene labels: one linear head per attribute, dropped after training
            from ..data.world import TEXT_ALPHABET
            classes = {attr: len(values) for attr, values in _attributes()}
            if cfg.label_cells:
                classes["cell"] = len(_cells())
            if cfg.label_chars:
                classes["char"] = len(TEXT_ALPHABET)
            if cfg.label_relations:
                classes["relation"] = len(RELATION_LABELS)
            self.label_heads = nn.ModuleDict({name: nn.Linear(cfg.vision_width, n) for name, n in classes.items()})

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._embed(self.vision_model(pixels)[0][:, 1:].mean(1))    # mean of the patch states

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_model(ids, mask)).float(), dim=-1)

    def forward(self, pixels, ids, mask, regions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, image-to-text logits (B, B)). regions: (pool, phrase_ids, phrase_mask, target),
        see `CaptionBatcher.regions`; adds `region_weight` x the region-phrase loss."""
        states = self.vision_model(pixels)[0][:, 1:]                      # (B, P, D)
        img = self._embed(states.mean(1))
        txt = self.encode_text(ids, mask)
        scale = self.logit_scale.exp()
        logits = scale * img @ txt.t()                                    # (B_img, B_txt)
        target = torch.arange(len(logits), device=logits.device)
        loss = self.caption_weight * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        if regions is not None:
            pool, phrase_ids, phrase_mask, region_target, *attributes = regions
            flat = states.reshape(-1, states.shape[-1])                          # (B*P, D)
            embedded = {}
            if self.region_weight > 0:
                region = embedded[id(pool)] = self._embed(pool @ flat)           # (R, E)
                phrase = self.encode_text(phrase_ids, phrase_mask)               # (U, E) distinct phrases
                loss = loss + self.region_weight * F.cross_entropy(scale * region @ phrase.t(), region_target)
            if attributes and isinstance(attributes[-1], dict):     # dense scene labels (`CaptionBatcher.regions`)
                labels = attributes.pop()
                patches = {id(pool): self.post_layernorm(pool @ flat) for pool, _ in labels["targets"].values()}
                # the relation head comes on top: the other heads keep the weight they had without it
                heads = len(labels["targets"]) - ("relation" in labels["targets"])
                loss = loss + labels["weight"] / heads * sum(
                    _label_loss(self.label_heads[name](patches[id(pool)]).float(), target)
                    for name, (pool, target) in labels["targets"].items())
            for attr_pool, word_ids, word_mask, word_target, weight in attributes:   # one attribute's words each
                if id(attr_pool) not in embedded:
                    embedded[id(attr_pool)] = self._embed(attr_pool @ flat)
                where = embedded[id(attr_pool)]
                word = self.encode_text(word_ids, word_mask)
                loss = loss + weight * F.cross_entropy(scale * where @ word.t(), word_target)
        return loss, logits

    def _embed(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.post_layernorm(pooled)).float(), dim=-1)


def world_tokenizer() -> str:
    """Word-level tokenizer.json over the world's words; capitals and digits split one per token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from ..data import world_words
    from ..data.world import TEXT_ALPHABET
    words = {w.lower() for w in world_words()} | set(TEXT_ALPHABET) | set("0123456789,.:;?!'-")
    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>"] + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[A-Z0-9]|[^A-Za-z0-9]"), behavior="isolated")])
    tok.add_special_tokens(["<unk>", "<pad>"])
    return tok.to_str()


def init_weights(model: ClipModel) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("class_embedding"):
                nn.init.normal_(p, 0.0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _label_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for a head naming one class per patch; for the multi-label relation head (float
    targets (N, len(RELATION_LABELS))), binary cross-entropy summed over a direction's kinds and averaged
    over directions, so that it weighs about as much as one class per patch."""
    if target.dtype != torch.float32:
        return F.cross_entropy(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce.sum(-1).mean() / len(RELATION_DIRECTIONS)


def _relation_labels() -> tuple[tuple[str, str], ...]:
    """(direction, kind) pairs the relation head names: "this object is left of a square", "... left of a
    red square", one per direction of RELATIONS and per shape and colour + shape, the references relation
    questions use (REF_FOR_POSITION; the size + colour + shape ones are rare)."""
    from ..data.world import COLORS, SHAPES
    kinds = (*SHAPES, *(f"{c} {s}" for c in COLORS for s in SHAPES))
    return tuple((d, k) for d in RELATION_DIRECTIONS for k in kinds)


RELATION_DIRECTIONS = tuple(RELATIONS)      # left, right, above, below
RELATION_LABELS = _relation_labels()
_RELATION_INDEX = {label: i for i, label in enumerate(RELATION_LABELS)}


def relation_targets(scene) -> list[list[float]]:
    """Per object of the scene, in order: the relation head's multi-hot target. Label (d, kind) is 1
    when some other object of that kind lies in direction d of this one, by the grid columns / rows
    relation questions compare (data.language.RELATIONS)."""
    out = []
    for o in scene.objects:
        row = [0.0] * len(RELATION_LABELS)
        for other in scene.objects:
            if other is o:
                continue
            for d in RELATION_DIRECTIONS:
                if RELATIONS[d](o, other):
                    row[_RELATION_INDEX[(d, other.shape)]] = 1.0
                    row[_RELATION_INDEX[(d, f"{other.color} {other.shape}")]] = 1.0
        out.append(row)
    return out


def _cells() -> tuple[str, ...]:
    """The grid cells' names, row-major: what "where is the X?" answers and the cell label head names."""
    from ..data.world import CELL_NAMES
    return tuple(name for row in CELL_NAMES for name in row)


class CaptionBatcher:
    """Scenes of one world seed -> (pixels, token ids, mask) batches."""

    def __init__(self, cfg: ClipConfig, tokenizer, world_seed: int):
        from ..data import WorldConfig
        from ..processing.images import ImageProcessorConfig
        self.cfg, self.tok, self.seed = cfg, tokenizer, world_seed
        self.world = WorldConfig(image_size=cfg.image_size)
        self.processor = ImageProcessorConfig.from_hf(image_processor_config(cfg.image_size))
        self.pad = tokenizer.token_to_id("<pad>")
        # the words every object region / character is contrasted with: the same each batch, tokenized once
        from ..data.language import object_phrase
        from ..data.world import TEXT_ALPHABET
        self.attribute_words = [(attr, values, *self._tokens([object_phrase(_with(attr, v), (attr,)) for v in values]))
                                for attr, values in _attributes()]
        self.alphabet = self._tokens(list(TEXT_ALPHABET))

    def batch(self, start: int, n: int, canonical: bool = False, regions: bool = False):
        """-> (pixels, ids, mask, texts), plus `regions(...)` of the same scenes when asked."""
        from ..data import generate
        from ..processing.images import preprocess_batch
        examples = list(generate(n, self.seed, self.world, start))
        rng = random.Random(self.seed * 1_000_003 + start)
        texts = [e.captions[0] if canonical or rng.random() < 0.5 else rng.choice(e.captions[1:]) for e in examples]
        pixels = preprocess_batch([e.image for e in examples], self.processor)
        out = (pixels, *self._tokens(texts), texts)
        return out + (self.regions([e.scene for e in examples]),) if regions else out

    def regions(self, scenes) -> tuple:
        """Every object of the scenes: (pool (R, B*P): mean over the patches its box touches,
        phrase ids / mask (U, T) of the batch's distinct object phrases, target (R,) its phrase),
        then, when `attribute_weight` is set, one (pool, word ids, word mask, target (R,), weight) per
        attribute: every word of that attribute ("circle", ..., "red object", ..., "small object"),
        and when `glyph_weight` is set, one more whose pool rows are the rendered characters and
        whose words are the text alphabet. With `attribute_pooling="patch"` the attribute rows are
        single patches (each patch whose centre lies inside an object, with that object's word).
        When `label_weight` is set, the last item is a dict {"weight", "targets": {head: (pool,
        target)}}: shape, colour and size per patch inside an object, and "char" per patch inside a
        rendered character when the batch has text, and "cell" per patch inside an object (the object's
        grid cell) with `label_cells`."""
        from ..data.language import object_phrase
        from ..data.world import TEXT_ALPHABET
        grid = self.cfg.image_size // self.cfg.patch_size
        P = grid * grid
        rows, phrases, target = [], {}, []
        for b, scene in enumerate(scenes):
            cell = scene.image_size / grid               # pixels per patch on the rendered image
            for o in scene.objects:
                rows.append([b * P + j for j in self._patches(o.bbox, cell, grid)])
                target.append(phrases.setdefault(object_phrase(o), len(phrases)))
        pool = _mean_pool(rows, len(scenes) * P)
        out = (pool, *self._tokens(list(phrases)), torch.tensor(target))
        objects = [o for scene in scenes for o in scene.objects]
        if self.cfg.attribute_pooling == "patch" or self.cfg.label_weight > 0:
            # every patch whose centre lies inside an object, once per patch, with its object
            inside = [[b * P + j for j in self._patches(o.bbox, scene.image_size / grid, grid, centres=True)]
                      for b, scene in enumerate(scenes) for o in scene.objects]
            patch_pool = _mean_pool([[j] for idx in inside for j in idx], len(scenes) * P)
            patch_objects = [o for o, idx in zip(objects, inside) for _ in idx]
        if self.cfg.attribute_weight > 0:
            if self.cfg.attribute_pooling == "patch":
                attr_pool, objects = patch_pool, patch_objects
            else:
                attr_pool = pool
            for attr, values, ids, mask in self.attribute_words:
                out += ((attr_pool, ids, mask, torch.tensor([values.index(getattr(o, attr)) for o in objects]),
                         self.cfg.attribute_weight / 3),)
        if self.cfg.glyph_weight > 0:
            chars = self._characters(scenes)
            if chars:      # each rendered character's patches against the alphabet
                out += ((_mean_pool([idx for idx, _ in chars], len(scenes) * P), *self.alphabet,
                         torch.tensor([TEXT_ALPHABET.index(ch) for _, ch in chars]), self.cfg.glyph_weight),)
        if self.cfg.label_weight > 0:
            targets = {a: (patch_pool, torch.tensor([v.index(getattr(o, a)) for o in patch_objects]))
                       for a, v in _attributes()}
            if self.cfg.label_cells:
                targets["cell"] = (patch_pool, torch.tensor([_cells().index(o.cell) for o in patch_objects]))
            if self.cfg.label_relations:     # one row per object, repeated for each of its patches
                rows = [row for scene in scenes for row in relation_targets(scene)]
                targets["relation"] = (patch_pool, torch.tensor([row for row, idx in zip(rows, inside) for _ in idx]))
            characters = self._characters(scenes, centres=True) if self.cfg.label_chars else []
            glyphs = [(j, ch) for idx, ch in characters for j in idx]
            if glyphs:     # every patch inside a rendered character names the character
                targets["char"] = (_mean_pool([[j] for j, _ in glyphs], len(scenes) * P),
                                   torch.tensor([TEXT_ALPHABET.index(ch) for _, ch in glyphs]))
            out += ({"weight": self.cfg.label_weight, "targets": targets},)
        return out

    def _characters(self, scenes, centres: bool = False) -> list[tuple[list[int], str]]:
        return character_patches(scenes, self.cfg.image_size // self.cfg.patch_size, centres)

    @staticmethod
    def _patches(box, cell: float, grid: int, centres: bool = False) -> list[int]:
        """Row-major indices of the patches a pixel box (x0, y0, x1, y1) touches; with `centres`, of
        those whose centre lies in the box (the touched ones when no centre does)."""
        x0, y0, x1, y1 = box
        if centres:
            inside = [r * grid + c for r in range(grid) for c in range(grid)
                      if x0 <= (c + 0.5) * cell <= x1 and y0 <= (r + 0.5) * cell <= y1]
            if inside:
                return inside
        c0, c1 = int(x0 // cell), min(grid - 1, int(x1 // cell))
        r0, r1 = int(y0 // cell), min(grid - 1, int(y1 // cell))
        return [r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        n, T = len(texts), min(self.cfg.text_max_len, max(len(e.ids) for e in encs))
        ids = torch.full((n, T), self.pad, dtype=torch.long)
        mask = torch.zeros((n, T), dtype=torch.bool)
        for i, e in enumerate(encs):
            k = min(T, len(e.ids))
            ids[i, :k] = torch.tensor(e.ids[:k])
            mask[i, :k] = True
        return ids, mask


def character_patches(scenes, grid: int, centres: bool = False) -> list[tuple[list[int], str]]:
    """(batch-wide patch indices, character) of every rendered character of the scenes, on a grid x
    grid patch layout; see `CaptionBatcher._patches` for `centres`."""
    from ..data.render import text_boxes
    return [([b * grid * grid + j for j in CaptionBatcher._patches((x0, y0, x1 - 1, y1 - 1), scene.image_size / grid,
                                                                    grid, centres)], ch)
            for b, scene in enumerate(scenes)                            # text boxes are end-exclusive
            for (x0, y0, x1, y1), ch in zip(text_boxes(scene), scene.text or "")]


def _mean_pool(rows: list[list[int]], width: int) -> torch.Tensor:
    """(len(rows), width) matrix whose row i averages the columns rows[i] names."""
    pool = torch.zeros(len(rows), width)
    for i, idx in enumerate(rows):
        pool[i, idx] = 1.0 / len(idx)
    return pool


def _with(attr: str, value: str):
    """A stand-in object with just `attr` set, for `object_phrase`."""
    from types import SimpleNamespace
    return SimpleNamespace(**{attr: value})


@torch.no_grad()
def retrieval_accuracy(model: ClipModel, pixels, ids, mask) -> dict:
    """Zero-shot retrieval top-1 on one batch: each image among all captions and the reverse."""
    model.eval()
    img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
    sims = img @ txt.t()
    target = torch.arange(len(sims))
    i2t = (sims.argmax(1) == target).float().mean().item()
    t2i = (sims.argmax(0) == target).float().mean().item()
    model.train()
    return {"image_to_text_top1": round(i2t, 4), "text_to_image_top1": round(t2i, 4), "candidates": len(sims)}


def save_vision_tower(model: ClipModel, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """The tower in transformers' CLIPVisionModel layout (`vision_model.*`)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    v = model.vision_cfg
    tensors = {f"vision_model.{k}": t for k, t in model.vision_model.state_dict().items()}
    tensors |= {f"vision_model.post_layernorm.{k}": t for k, t in model.post_layernorm.state_dict().items()}
    tensors = {k: (t.to(dtype) if dtype else t).detach().contiguous() for k, t in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
              "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
              "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
              "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
              "projection_dim": model.visual_projection.out_features,
              "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor_config(v.image_size), indent=2))
    return folder


def save_text_encoder(model: ClipModel, cfg: ClipConfig, folder: Path, tokenizer_json: str) -> Path:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"text_model.{k}": t for k, t in model.text_model.state_dict().items()}
    tensors |= {"text_projection.weight": model.text_projection.weight,
                "visual_projection.weight": model.visual_projection.weight,
                "logit_scale": model.logit_scale.reshape(1)}
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = {"model_type": "foveal_clip_text", "vocab_size": model.text_model.token_embedding.num_embeddings,
              "hidden_size": cfg.text_width, "num_hidden_layers": cfg.text_layers,
              "num_attention_heads": cfg.text_heads, "max_position_embeddings": cfg.text_max_len,
              "projection_dim": cfg.embed_dim, "pooling": "mean", "image_pooling": "mean_patches_post_layernorm"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    return folder


def train_clip(cfg: ClipConfig) -> dict:
    """Train, evaluate retrieval, write OUTPUT (the tower) and OUTPUT/text_encoder; returns the report."""
    from tokenizers import Tokenizer

    from ..api import default_dtype
    from .plot import plot_losses
    from .trainer import _progress, budget_lr_factor
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    tokenizer_json = world_tokenizer()
    tok = Tokenizer.from_str(tokenizer_json)
    model = ClipModel(cfg, tok.get_vocab_size())
    init_weights(model)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    precision = {"auto": default_dtype("cpu"), "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.precision]
    autocast = torch.autocast("cpu", dtype=precision) if precision != torch.float32 else nullcontext()
    train_data = CaptionBatcher(cfg, tok, cfg.seed)
    held_out = CaptionBatcher(cfg, tok, cfg.seed + EVAL_SEED_OFFSET).batch(0, cfg.eval_size, canonical=True)
    total, warmup = cfg.max_steps, max(1, int(cfg.warmup_ratio * cfg.max_steps))
    bar = _progress(total, 0, cfg.progress)
    history, t0 = [], time.perf_counter()
    budget_s = cfg.minutes * 60 if cfg.minutes else None
    regional = max(cfg.region_weight, cfg.attribute_weight, cfg.glyph_weight, cfg.label_weight) > 0
    for step in range(total):
        factor = budget_lr_factor(step, total, warmup, time.perf_counter() - t0, budget_s)
        pixels, ids, mask, _, *regions = train_data.batch(step * cfg.batch_size, cfg.batch_size, regions=regional)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * factor
        with autocast:
            loss, _ = model(pixels, ids, mask, *regions)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        elapsed = time.perf_counter() - t0
        history.append({"step": step + 1, "loss": loss.item(), "logit_scale": round(model.logit_scale.exp().item(), 3),
                        "images_per_s": round((step + 1) * cfg.batch_size / elapsed, 1)})
        bar.update(step + 1, history[-1]["loss"], factor, history[-1]["images_per_s"])
        if budget_s and elapsed >= budget_s:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    with autocast:
        retrieval = retrieval_accuracy(model, *held_out[:3])
    model.eval()
    save_vision_tower(model, out)
    save_text_encoder(model, cfg, out / "text_encoder", tokenizer_json)
    report = {"steps": len(history), "planned_steps": total, "seconds": round(elapsed, 1),
              "images_seen": len(history) * cfg.batch_size, "final_loss": round(history[-1]["loss"], 4),
              "logit_scale": history[-1]["logit_scale"], "held_out_seed": cfg.seed + EVAL_SEED_OFFSET,
              "retrieval": retrieval}
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / "clip_report.json").write_text(json.dumps(report, indent=2))
    plot_losses([h["step"] for h in history], [h["loss"] for h in history], out / "loss.png", "foveal train clip")
    r = retrieval
    print(f"clip: {len(history)} steps in {elapsed:.0f} s, loss {report['final_loss']}, zero-shot retrieval on "
          f"{r['candidates']} held-out pairs: image->text top-1 {r['image_to_text_top1']:.1%}, text->image top-1 "
          f"{r['text_to_image_top1']:.1%}; wrote {out}", file=sys.stderr)
    return report
