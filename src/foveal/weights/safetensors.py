"""Hugging Face safetensors checkpoints -> foveal's canonical state dict.

Design decisions:
- Our own header parser (the format is 8 bytes + JSON + raw data) so that every check can name
  the file and the tensor: a header that lies, a tensor whose bytes run past the end of the
  file (truncation), a dtype we do not know, a shape that disagrees with its byte count.
- Tensors are views of a private (copy-on-write) mmap: when the stored dtype is the one asked
  for, parameters point straight into the file pages and nothing is copied; when it differs,
  each tensor is converted alone and its file pages are released right away (MADV_DONTNEED),
  so peak memory stays near the size of the converted model, never model + file.
- Name layouts (legacy llava-hf, transformers v5, transformers 5.2x's own mix, the original
  LLaVA repo, plain HF text LMs, separate CLIP/SigLIP towers) are normalised by the ordered
  rules in NAME_RULES; the first rule that matches wins.
- Never pickle: `.bin` / `.pt` checkpoints are refused with a message saying so.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WeightsError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024

# (pattern, replacement) applied in order to every checkpoint name; canonical names are the
# module paths of foveal.models.vlm.VLM.
NAME_RULES = [
    # llava-hf legacy and transformers 5.2x save_pretrained
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    # transformers v5 in-memory / >= 4.52 saves
    (r"^model\.language_model\.", "language_model."),
    (r"^model\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),   # original repo, tower inside
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    # original LLaVA repo and plain HF text LMs
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    (r"^model\.(layers|embed_tokens|norm)\b", r"language_model.\1"),
    # a separate CLIP / SigLIP checkpoint (CLIPVisionModel or the full CLIPModel)
    (r"^vision_model\.", "vision_tower."),
    # ... as transformers 5.2x's CLIPVisionModel / SiglipVisionModel.save_pretrained writes it (no prefix)
    (r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.", r"vision_tower.\1."),
]
_COMPILED_RULES = [(re.compile(p), r) for p, r in NAME_RULES]
IGNORED = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


def canonical_name(name: str) -> str:
    for pattern, replacement in _COMPILED_RULES:
        new, n = pattern.subn(replacement, name, count=1)
        if n:
            return new
    return name


@dataclass
class TensorInfo:
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int              # absolute byte offset in the file
    end: int


@dataclass
class SafetensorsFile:
    """One parsed, validated .safetensors file, its data mapped lazily."""
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict = field(default_factory=dict)
    _map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path) -> "SafetensorsFile":
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{path}: file is {size} bytes, too short to be safetensors")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, MAX_HEADER_BYTES):
                    raise WeightsError(f"{path}: header claims {n} bytes but the file has {size - 8}; "
                                       f"the file is truncated or not safetensors")
                raw = f.read(n)
        except OSError as e:
            raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: header is not valid JSON; the file is corrupt") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{path}: header is not a JSON object; the file is corrupt")
        metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        tensors = {}
        for name, entry in header.items():
            tensors[name] = _tensor_info(path, name, entry, base, size)
        return cls(path=path, tensors=tensors, metadata=metadata)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: private pages, so torch may see them as writable without touching the file
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.tensors[name]
        numel = 1
        for d in info.shape:
            numel *= d
        if numel == 0:
            return torch.empty(info.shape, dtype=dtype or info.dtype)
        mm = self._mapped()
        item = torch.empty((), dtype=info.dtype).element_size()
        if info.start % item == 0:
            t = torch.frombuffer(mm, dtype=info.dtype, count=numel, offset=info.start).view(info.shape)
        else:   # unaligned data: copy out (rare; the format pads the header to 8 bytes)
            t = torch.frombuffer(bytearray(mm[info.start:info.end]), dtype=info.dtype).view(info.shape)
        if dtype is None or dtype == info.dtype:
            return t
        out = t.to(dtype)
        self._release(info)
        return out

    def release(self, name: str) -> None:
        """Drop the file pages of tensor `name` from this process's memory (it reads back from the
        file if touched again): for callers that converted it and keep no view of it."""
        if self._map is not None:
            self._release(self.tensors[name])

    def _release(self, info: TensorInfo) -> None:
        page = mmap.PAGESIZE
        start = info.start // page * page
        length = (info.end - start + page - 1) // page * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, min(length, len(self._map) - start))
        except (AttributeError, OSError, ValueError):
            pass    # not on this platform: only costs memory


def _tensor_info(path: Path, name: str, entry, base: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise WeightsError(f"{where}: malformed header entry")
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise WeightsError(f"{where}: unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise WeightsError(f"{where}: malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise WeightsError(f"{where}: malformed data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if begin < 0 or end < begin or end - begin != nbytes:
        raise WeightsError(f"{where}: shape {shape} in {entry['dtype']} needs {nbytes} bytes "
                           f"but its offsets span {end - begin}")
    if base + end > size:
        raise WeightsError(f"{where}: data ends at byte {base + end} but the file has {size} bytes; "
                           f"the file is truncated")
    return TensorInfo(path, name, dtype, tuple(shape), base + begin, base + end)


class MemoryCheckpoint:
    """A GGUF's tensors, made on request (`LazyTensors`), with SafetensorsFile's lookup interface."""

    def __init__(self, origin: str, tensors):
        self.path = origin
        self._tensors = tensors
        self.tensors = {}
        for k in tensors:
            shape, dtype = tensors.meta(k)
            self.tensors[k] = TensorInfo(Path(origin), k, dtype, shape, 0, 0)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._tensors.pop(name)        # hand the tensor over: the model keeps the only reference
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def sources(self) -> dict[str, tuple["MemoryCheckpoint", str]]:
        return {canonical_name(k): (self, k) for k in self.tensors if not IGNORED.search(k)}


def checkpoint_files(folder: Path) -> list[Path]:
    """The .safetensors files of a checkpoint folder (sharded via the index, or all of them)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise WeightsError(f"{index} lists shards that are not on disk: {', '.join(missing)}")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (f"; found {', '.join(pickles)}: pickle checkpoints are not loaded (they can run code), "
                f"convert them to safetensors") if pickles else ""
        raise WeightsError(f"no .safetensors files in {folder}{hint}")
    return files


def open_checkpoint(folder_or_files) -> dict[str, tuple[SafetensorsFile, str]]:
    """canonical name -> (file, stored name) over every file of a checkpoint."""
    files = checkpoint_files(folder_or_files) if isinstance(folder_or_files, (str, Path)) else folder_or_files
    out: dict[str, tuple[SafetensorsFile, str]] = {}
    for path in files:
        st = SafetensorsFile.open(path)
        for name in st.tensors:
            if IGNORED.search(name):
                continue
            out[canonical_name(name)] = (st, name)
    return out


def load_into(model: torch.nn.Module, sources: dict[str, tuple[SafetensorsFile, str]], dtype: torch.dtype,
              device="cpu", optional: set[str] = frozenset()) -> list[str]:
    """Assign checkpoint tensors to a model built on the meta device. Returns unused names.

    Every parameter must be present with its exact shape; `optional` names may be absent (a tied
    LM head). Float tensors are cast to `dtype`; integer ones keep theirs. `device`: a device, or a
    function of the tensor's name (a model split by --gpu-layers).
    """
    expected = dict(model.state_dict(keep_vars=True))
    # tensors already materialised (layers quantized straight from the checkpoint) need no source
    missing = [k for k in expected if k not in sources and k not in optional and expected[k].is_meta]
    if missing:
        files = sorted({str(st.path) for st, _ in sources.values()})
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightsError(f"checkpoint {', '.join(files)} lacks tensor(s) {shown}")
    state, unused = {}, []
    for name, (st, stored) in sources.items():
        if name not in expected:
            unused.append(stored)
            continue
        want = tuple(expected[name].shape)
        info = st.tensors[stored]
        if info.shape != want:
            raise WeightsError(f"{st.path}: tensor {stored!r} has shape {list(info.shape)} "
                               f"but the config implies {list(want)}")
        target = dtype if info.dtype.is_floating_point else None
        t = st.get(stored, target)
        where = device(name) if callable(device) else device
        if torch.device(where).type != "cpu":
            t = t.to(where)
        state[name] = t
    model.load_state_dict(state, strict=False, assign=True)
    return unused
