"""LLaVA conversation JSON -> tokenized training examples -> right-padded batches.

Mirrors LLaVA's `LazySupervisedDataset` / `preprocess_v1` (llava/train/train.py): one record
is `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from":
"gpt", "value": ...}]}` with the image path relative to `--image-folder`.

Design decisions:
- A record becomes chat messages and is rendered by the model's own chat template, the same
  path inference takes, so training and serving see one prompt format. The `<image>` marker is
  moved in front of its turn's text, as LLaVA's `preprocess_multimodal` does.
- Labels are the input ids where the template's `{% generation %}` blocks put assistant text
  (templates without them: what each assistant turn adds to the rendered prefix), -100 elsewhere (system, user, image positions, padding). An EOS token that the template
  writes right after an assistant block is labelled too (that is how the model learns to stop);
  a template that writes none gets one appended after the final answer.
- Everything that can be checked before training is checked when the file is read (JSON shape,
  roles, `<image>` count against the images, image files present, length): a bad record fails
  at once with its id, not hours into a run. Pixels are decoded per batch.
- Batches are right-padded: with a causal mask, real tokens never see padding and every row's
  positions are 0..T-1, so no attention mask is needed.
- Any family: the family's processor builds the prompt (its image placeholder run, sized by each
  image's (height, width) read from the file header where the count follows the size), makes the
  pixels (`processor.pixels`), and, where RoPE positions are not 0..T-1 (Qwen2-VL's M-RoPE), the
  positions of each example (`processor.positions`), stacked per batch as (3, B, T).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FovealError, ImageError, PromptError
from ..models.interface import ImageChunk
from ..models.vlm import VisionLanguageModel
from ..processing.images import ImageLimits, image_size, load_image, preprocess_batch, preprocess_views
from ..processing.prompt import IMAGE_PLACEHOLDER, normalize_messages

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DatasetError(FovealError, ValueError):
    """A training data file or one of its records is malformed; the message names the record."""


@dataclass
class Record:
    id: str
    images: list[Path]
    messages: list[dict]          # chat messages with typed content parts (images as paths)


@dataclass
class TrainExample:
    id: str
    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]
    images: list[Path]
    image_sizes: list[tuple[int, int]] | None = None    # (height, width) per image, where the count follows it
    positions: torch.Tensor | None = None               # (3, T) RoPE positions, where not 0..T-1 (M-RoPE)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def read_records(path: Path, image_folder: Path | None = None, check_files: bool = True) -> list[Record]:
    """Read and validate a LLaVA-format JSON (a list) or JSONL file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"training data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path} must hold a JSON list of records, found {type(raw).__name__}")
    if not raw:
        raise DatasetError(f"{path} holds no records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    return [parse_record(r, i, folder, check_files) for i, r in enumerate(raw)]


def parse_record(r, index: int, image_folder: Path, check_files: bool = True) -> Record:
    if not isinstance(r, dict):
        raise DatasetError(f"record #{index} is a {type(r).__name__}, expected an object with 'conversations'")
    rid = str(r.get("id", f"#{index}"))
    where = f"record {rid!r} (#{index})"
    convs = r.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DatasetError(f"{where} has no 'conversations' list")
    image = r.get("image")
    names = [] if image in (None, "") else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"{where}: 'image' must be a path or a list of paths, got {image!r}")
    images = [image_folder / n for n in names]
    if check_files:
        for p in images:
            if not p.is_file():
                raise DatasetError(f"{where}: image file {p} does not exist (image paths are read relative "
                                   f"to --image-folder, here {image_folder})")
    messages, n_markers, has_answer = [], 0, False
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DatasetError(f"{where}, turn {j}: expected {{'from': ..., 'value': string}}, got {turn!r:.80}")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise DatasetError(f"{where}, turn {j}: unknown speaker {turn.get('from')!r} "
                               f"(expected human, gpt or system)")
        value = turn["value"]
        k = value.count(IMAGE_PLACEHOLDER)
        if k and role != "user":
            raise DatasetError(f"{where}, turn {j}: {IMAGE_PLACEHOLDER} may only appear in a human turn")
        n_markers += k
        parts = [{"type": "image", "image": None} for _ in range(k)]
        text = value.replace(IMAGE_PLACEHOLDER, "").strip() if k else value
        parts.append({"type": "text", "text": text})
        messages.append({"role": role, "content": parts})
        has_answer |= role == "assistant"
    if n_markers != len(images):
        if images and not n_markers:
            raise DatasetError(f"{where} has an image ({names[0]}) but no {IMAGE_PLACEHOLDER} marker in its "
                               f"conversation; put '{IMAGE_PLACEHOLDER}\\n' at the start of the first human turn")
        raise DatasetError(f"{where} has {n_markers} {IMAGE_PLACEHOLDER} marker(s) but {len(images)} image(s)")
    if not has_answer:
        raise DatasetError(f"{where} has no gpt turn: nothing to learn from")
    it = iter(images)
    for m in messages:
        for part in m["content"]:
            if part["type"] == "image":
                part["image"] = next(it)
    return Record(rid, images, messages)


class _PrefixSpans:
    """A PromptBuilder view for templates without `{% generation %}` (most Qwen / ChatML ones):
    an assistant turn is what rendering messages[:i+1] adds to messages[:i] + generation
    prompt, as TRL finds it. Its closing tokens (`<|im_end|>`) fall in the span and are learnt."""

    def __init__(self, prompt):
        self.prompt = prompt

    def render(self, messages, add_generation_prompt=True):
        from ..processing.prompt import RenderedChat
        full = self.prompt.render(messages, add_generation_prompt)
        if full.generation_spans:
            return full
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.prompt.render(messages[:i], True).text if i else ""
            upto = self.prompt.render(messages[:i + 1], False).text
            if upto.startswith(before) and full.text.startswith(upto):
                spans.append((len(before), len(upto)))
        return RenderedChat(full.text, spans)


def tokenize(record: Record, prompt, eos_id: int | None, max_length: int | None = None,
             image_sizes: list[tuple[int, int]] | None = None, image_tokens: list[int] | None = None) -> TrainExample:
    """One record -> ids, labels (assistant tokens + their EOS), image mask. image_tokens: each image's
    token count where it depends on the image (anyres), measured at image_sizes."""
    try:
        template_messages, sources = normalize_messages(record.messages, prompt.template, model="training")
    except PromptError as e:
        raise DatasetError(f"record {record.id!r}: {e}") from None
    if not re.search(r"{%-?\s*generation\s*-?%}", prompt.template):
        import copy
        view = copy.copy(prompt)
        view.render = _PrefixSpans(prompt).render
        prompt = view
    try:
        built = prompt.build(template_messages, n_images=len(sources), add_generation_prompt=False,
                             track_assistant=True, image_tokens=image_tokens)
    except PromptError as e:
        raise DatasetError(f"record {record.id!r}: {e}") from None
    ids, image_mask = list(built.input_ids), list(built.image_mask)
    assistant = list(built.assistant_mask or [False] * len(ids))
    if not any(assistant):
        raise DatasetError(f"record {record.id!r}: the chat template marks no assistant tokens (it needs "
                           f"{{% generation %}} blocks around assistant text to train on)")
    labels = [t if a else IGNORE_INDEX for t, a in zip(ids, assistant)]
    if eos_id is not None:
        for i in range(1, len(ids)):
            if assistant[i - 1] and not assistant[i] and ids[i] == eos_id:
                labels[i] = eos_id
        start = len(assistant)
        while start and assistant[start - 1]:
            start -= 1
        if assistant[-1] and eos_id not in ids[start:]:   # the last answer ends without an EOS: add one
            ids.append(eos_id)
            labels.append(eos_id)
            image_mask.append(False)
    if max_length is not None and len(ids) > max_length:
        last_image = max((i for i, m in enumerate(image_mask) if m), default=-1)
        if last_image >= max_length:
            raise DatasetError(f"record {record.id!r} is {len(ids)} tokens long and its image tokens end at "
                               f"{last_image + 1}, past --max-length {max_length}; raise --max-length or shorten it")
        ids, labels, image_mask = ids[:max_length], labels[:max_length], image_mask[:max_length]
    return TrainExample(record.id, ids, labels, image_mask, record.images, image_sizes)


class ConversationDataset:
    """Tokenized examples of one LLaVA file; pixels are loaded per batch by `collate`."""

    def __init__(self, examples: list[TrainExample], image_config=None, image_limits: ImageLimits | None = None,
                 anyres: bool = False, processor=None):
        self.examples = examples
        self.image_config = image_config
        self.image_limits = image_limits or ImageLimits()
        self.anyres = anyres          # LLaVA-NeXT: each image is its own views and token count
        self.processor = processor    # another family's: it makes the pixels (None: LLaVA's preprocessing)

    @classmethod
    def from_file(cls, path, vlm, image_folder=None, max_length: int | None = None) -> ConversationDataset:
        records = read_records(Path(path), Path(image_folder) if image_folder else None)
        if not vlm.model.has_vision and any(r.images for r in records):
            first = next(r for r in records if r.images)
            raise DatasetError(f"record {first.id!r} has an image but the model has no vision tower")
        eos = sorted(vlm.tokenizer.eos_ids() or set(vlm.config.text.eos_token_id))
        max_length = max_length or vlm.config.text.max_position_embeddings
        if not getattr(vlm.model, "trainable", False):
            raise DatasetError(f"foveal train does not train {vlm.family.NAME} models yet")
        llava = isinstance(vlm.model, VisionLanguageModel)
        limits, anyres = vlm.image_limits, llava and vlm.config.anyres
        positions_of = getattr(vlm.processor, "positions", None)
        examples = []
        for r in records:
            sizes = counts = None
            if anyres or not llava:      # the token count depends on the image's size: read it from the header
                try:
                    sizes = [image_size(p, limits) for p in r.images]
                except ImageError as err:
                    raise DatasetError(f"record {r.id!r}: {err}") from None
                counts = [vlm.processor.image_tokens(s) for s in sizes]
            example = tokenize(r, vlm.prompt, eos[0] if eos else None, max_length, sizes, counts)
            if positions_of is not None:
                try:
                    example.positions = positions_of(example.input_ids, example.image_mask, sizes or [])
                except FovealError as err:
                    raise DatasetError(f"record {r.id!r}: {err}") from None
            examples.append(example)
        useless = [e.id for e in examples if e.n_label_tokens == 0]
        if useless:
            raise DatasetError(f"record {useless[0]!r} has no answer tokens left after truncation to "
                               f"--max-length {max_length}")
        return cls(examples, vlm.image_config, vlm.image_limits, anyres, None if llava else vlm.processor)

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: list[int], pad_id: int = 0) -> dict:
        """Examples -> right-padded tensors: input_ids, labels, image_mask (B, T), pixels (N, 3, H, W), or
        what another family's processor makes of the batch's images, and positions (3, B, T) where they are not
        0..T-1.
        An anyres model's pixels are every image's views in order, (sum of 1 + tiles, 3, S, S), with
        "views" (views per image) and "sizes" ((height, width) per image) to pack their features."""
        batch = [self.examples[i] for i in indices]
        T = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.bool)
        images, sizes, loaded_images = [], [], []
        positions = None
        if batch[0].positions is not None:          # padding keeps position 0: real tokens never see it
            positions = torch.zeros((batch[0].positions.shape[0], len(batch), T), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids).clamp_min(0)     # IMAGE_SLOT (-1) -> 0: overwritten
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = torch.tensor(e.image_mask)
            if positions is not None:
                positions[:, row, :n] = e.positions
            for k, p in enumerate(e.images):
                try:
                    loaded = load_image(p, self.image_limits)
                except (ImageError, OSError) as err:
                    raise DatasetError(f"record {e.id!r}: image {p} cannot be used: {err}") from None
                if e.image_sizes is not None and (loaded.height, loaded.width) != tuple(e.image_sizes[k]):
                    h, w = e.image_sizes[k]
                    raise DatasetError(f"record {e.id!r}: image {p} is now {loaded.width}x{loaded.height}, "
                                       f"it was {w}x{h} when the data was read (its token count depends on it)")
                images.append(loaded.image)
                sizes.append((loaded.height, loaded.width))
                loaded_images.append(loaded)
        out = {"input_ids": ids, "labels": labels, "image_mask": mask, "pixels": None, "ids": [e.id for e in batch]}
        if positions is not None:
            out["positions"] = positions                                    # (3, B, T)
        if images and self.processor is not None:
            out["pixels"] = self.processor.pixels([ImageChunk(im, 0) for im in loaded_images])
        elif images and self.anyres:
            views = [preprocess_views(im, self.image_config) for im in images]
            out |= {"pixels": torch.cat(views), "views": [v.shape[0] for v in views], "sizes": sizes}
        elif images:
            out["pixels"] = preprocess_batch(images, self.image_config)
        return out
