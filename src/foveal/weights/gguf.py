"""GGUF <-> Hugging Face format, through one in-memory checkpoint (`HFCheckpoint`).

foveal reads and writes llama.cpp's GGUF files (a text model plus an optional `mmproj` file
holding the vision tower and the LLaVA projector) by translating them to and from what an HF
LLaVA folder holds: a `config.json` dict, tensors under the legacy llava-hf names, a
`tokenizer.json`, the tokenizer config and the image processor config. The model core only
ever sees HF-format checkpoints; these modules are the one place that knows llama.cpp's names.

    ckpt = read_gguf("llava-v1.5-7b-Q4_K_M.gguf", "mmproj-model-f16.gguf")   # -> HFCheckpoint
    write_gguf(read_hf_folder("my-model/"), "out/", type="q8_0")             # -> (text, mmproj)

A family may own its llama.cpp mapping (Qwen2-VL: `models/families/qwen2_vl/gguf.py`, found
through `models.registry.GGUF_ARCHITECTURES`); its checkpoints use the names its HF folders
hold. The tables below are LLaVA's and the plain llama / qwen2 decoder's.

This file holds the interface, the conventions both directions share (tensor names, the llama
q/k row order, Llama 3 RoPE factors) and the validated container parser; `gguf_read.py` turns
a GGUF into an HFCheckpoint, `gguf_write.py` the reverse, `gguf_tokenizer.py` converts the
tokenizer.

Design decisions
- One neutral interface (`HFCheckpoint`, legacy llava-hf tensor names) so GGUF support does
  not depend on the model core's classes, and a GGUF model can be loaded by anything that
  loads an HF folder (transformers included).
- The name mappings are plain dicts below, used in both directions (reading inverts them).
- The container parser is our own (`GGUFFile`), not `gguf.GGUFReader`: every count, string
  length, array size, dimension and tensor extent is checked against the file size *before*
  anything is allocated or sliced, so a corrupt or hostile file fails with WeightsError (a
  truncated one says so), never a MemoryError or a crash. Metadata arrays are copied out (they
  are small); tensor data stays in the memory map until a tensor is converted. The `gguf`
  package is used for its constants, its numpy (de)quantizers and its writer.
- Tensors are converted one at a time: a view of the mapped bytes, rows reordered if needed
  (still quantized), dequantized by `gguf.quants` (vectorised numpy) to float32, then cast to
  the requested dtype: at most one full-precision copy besides the output is alive.
- The text model's tensors are converted when the loader takes them, not when the file is
  read (`LazyTensors`): loading a Q4_K file with `quant="int4"` holds one dequantized tensor
  at a time, never the whole model in bf16. The file stays mapped until the last is taken.
- llama-arch q/k weights are stored permuted by llama.cpp (interleaved rotary pairs); the
  permutation is undone on read and applied on write, on the (still quantized) rows.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from foveal.errors import UnsupportedModelError, WeightsError


class LazyTensors(Mapping):
    """name -> tensor, made when asked for: each lookup converts again, `pop` hands one over.
    Shapes and dtypes are known without converting anything."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] = {}

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> None:
        self._entries[name] = (tuple(shape), dtype, make)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._entries[name] = (tuple(tensor.shape), tensor.dtype, lambda: tensor)

    def prefixed(self, prefix: str) -> "LazyTensors":
        out = LazyTensors()
        out._entries = {prefix + k: v for k, v in self._entries.items()}
        return out

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype, _ = self._entries[name]
        return shape, dtype

    def pop(self, name: str) -> torch.Tensor:
        return self._entries.pop(name)[2]()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._entries[name][2]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class HFCheckpoint:
    """Everything an HF LLaVA (or plain causal-LM) folder holds, in memory.

    tensors use the legacy llava-hf names: `language_model.model.*`,
    `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
    `multi_modal_projector.linear_{1,2}.*`; a text-only checkpoint uses `model.*` and
    `lm_head.weight`; a family with its own GGUF mapping, the names its save_pretrained writes
    (Qwen2-VL: `model.layers.*`, `lm_head.weight`, `visual.*`).
    """

    config: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]     # a dict, or LazyTensors (read from a GGUF)
    tokenizer_json: str
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    preprocessor_config: dict[str, Any] | None = None

    @property
    def is_vlm(self) -> bool:
        return self.config.get("model_type") in ("llava", "llava_next")


# --- llama.cpp <-> HF tensor names -------------------------------------------------------
# Text model, per block: llama.cpp `blk.{i}.{key}.{weight|bias}` <-> HF `model.layers.{i}.{value}`.
# Same names for the llama and qwen2 architectures (qwen2 adds the q/k/v biases).
TEXT_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TEXT_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# mmproj (general.architecture = clip), per block: `v.blk.{i}.{key}` <-> `encoder.layers.{i}.{value}`.
# Current llama.cpp names fc1 `ffn_up` and fc2 `ffn_down`; files from the legacy LLaVA
# converter have them the other way round (detected from the shapes when reading).
VISION_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
# Whole-tensor names (suffix included) outside the blocks, relative to `vision_tower.vision_model.`.
VISION_GLOBAL_NAMES = {
    "v.class_embd": "embeddings.class_embedding",  # llama.cpp spells it without `.weight`
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "embeddings.patch_embedding.bias",  # SigLIP only
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight",  # CLIP only; (sic) HF's spelling
    "v.pre_ln.bias": "pre_layrnorm.bias",
    "v.post_ln.weight": "post_layernorm.weight",  # never part of LLaVA's features
    "v.post_ln.bias": "post_layernorm.bias",
}
IMAGE_NEWLINE = "model.image_newline"   # LLaVA-1.6's row separator, llama.cpp's name for it
PROJECTOR_NAMES = {
    "mm.0": "multi_modal_projector.linear_1",
    "mm.2": "multi_modal_projector.linear_2",
}
LLAVA_TEXT_PREFIX = "language_model."
LLAVA_VISION_PREFIX = "vision_tower.vision_model."


# --- conventions both directions share --------------------------------------------------
def llama_qk_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order P with gguf_rows = hf_rows[P] (llama.cpp's `LlamaModel.permute`): within each
    head, HF's two rotary halves are interleaved pairwise."""
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise WeightsError(f"cannot split {n_rows} q/k rows into {n_heads} rotary heads")
    # (heads, half, head_dim/2) -> (heads, head_dim/2, half): row h*hd + 2j + s <- h*hd + s*hd/2 + j
    return np.arange(n_rows).reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for an HF `llama3` rope_parameters (convert_hf_to_gguf.py)."""
    wavelen = 2 * math.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    smooth = (context / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < context / high, 1.0, factors)
    return np.where(wavelen > context / low, factor, factors)


# --- the container ----------------------------------------------------------------------
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 64 << 20  # chat templates are KBs; an embedded tokenizer.json some MBs
MAX_ARRAY_BYTES = 64 << 20  # a 256k-token vocabulary's scores are 1 MB
MAX_ARRAY_LEN = 1 << 24

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}
_FLOAT_TORCH = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch / HF order: ggml's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


def meta_str(meta: dict[str, Any], key: str, default: str | None = None) -> str | None:
    """A string metadata value; any other type there is a corrupt file."""
    value = meta.get(key, default)
    if value is not None and not isinstance(value, str):
        raise WeightsError(f"GGUF metadata {key} should be a string, not {type(value).__name__}")
    return value


def meta_bool(meta: dict[str, Any], key: str, default: bool | None = None) -> bool | None:
    """A boolean metadata value (llama.cpp writes bools; an integer 0/1 is accepted)."""
    value = meta.get(key, default)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise WeightsError(f"GGUF metadata {key} should be a boolean, not {value!r}"[:200])


def short_float(value: float) -> float:
    """The shortest decimal that is the same float32: what the writer was given."""
    return float(str(np.float32(value)))


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise WeightsError(
                f"{self.path}: file is truncated ({what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.size})"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.unpack("<Q", what)
        if n > limit:
            raise WeightsError(f"{self.path}: {what} claims an implausible {n}-byte string")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype == GGUFValueType.FLOAT32:  # 1e-06, not 9.999999974752427e-07
            return short_float(self.unpack("<f", what))
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[GGUFValueType(vtype)], what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            raise WeightsError(f"{self.path}: {what} has unknown value type {vtype}")
        etype, count = self.unpack("<I", what), self.unpack("<Q", what)
        if count > MAX_ARRAY_LEN:
            raise WeightsError(f"{self.path}: {what} claims an implausible {count}-element array")
        if etype == GGUFValueType.STRING:
            # each string takes at least its 8-byte length: bounds the loop by the file size
            self.need(8 * count, what)
            return [self.string(what) for _ in range(count)]
        if etype not in _ARRAY_DTYPES:
            raise WeightsError(f"{self.path}: {what} is an array of unsupported type {etype}")
        dtype = _ARRAY_DTYPES[GGUFValueType(etype)]
        nbytes = count * dtype.itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise WeightsError(f"{self.path}: {what} claims an implausible {nbytes}-byte array")
        self.need(nbytes, what)
        array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += nbytes
        return array


class GGUFFile:
    """A validated, memory-mapped GGUF file: `metadata` (key -> value) and `tensors`
    (name -> TensorInfo). Use as a context manager; `tensor()` converts one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise WeightsError(f"cannot open {self.path}: {e.strerror or e}") from e
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 24:
                raise WeightsError(f"{self.path} is too small ({size} bytes) to be a GGUF file")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self.metadata: dict[str, Any] = {}
            self.tensors: dict[str, TensorInfo] = {}
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        mapped = getattr(self, "_map", None)
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                pass
        self._file.close()

    def _parse(self, size: int) -> None:
        cur = _Cursor(self._map, size, self.path)
        magic = self._map[:4]
        if magic != b"GGUF":
            raise WeightsError(f"{self.path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
        cur.pos = 4
        version = cur.unpack("<I", "version")
        if version not in (2, 3):
            if version == 1:
                raise WeightsError(f"{self.path} is GGUF version 1, which llama.cpp dropped; re-convert it")
            if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
                raise WeightsError(f"{self.path} is a big-endian GGUF; foveal reads little-endian files")
            raise WeightsError(f"{self.path} has unsupported GGUF version {version}")
        n_tensors, n_kv = cur.unpack("<Q", "tensor count"), cur.unpack("<Q", "key count")
        # smallest possible entries: a key/value is >= 13 bytes, a tensor info >= 24
        if n_kv > (size - cur.pos) // 13 or n_tensors > (size - cur.pos) // 24:
            raise WeightsError(
                f"{self.path}: header claims {n_tensors} tensors and {n_kv} keys, more than "
                f"a {size}-byte file can hold (corrupt or truncated)"
            )
        for _ in range(n_kv):
            key = cur.string("metadata key", limit=MAX_KEY_BYTES)
            if key in self.metadata:
                raise WeightsError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.unpack("<I", key), key)

        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name", limit=MAX_KEY_BYTES)
            if len(name.encode()) >= GGML_MAX_NAME:
                raise WeightsError(f"{self.path}: tensor name {name[:80]!r} is too long")
            n_dims = cur.unpack("<I", name)
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise WeightsError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            ne = [cur.unpack("<Q", name) for _ in range(n_dims)]
            raw_type = cur.unpack("<I", name)
            offset = cur.unpack("<Q", name)
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise WeightsError(f"{self.path}: tensor {name!r} has unknown type {raw_type}") from None
            if ne[0] % block:
                raise WeightsError(f"{self.path}: tensor {name!r} rows ({ne[0]}) are not whole {qtype.name} blocks")
            nbytes = math.prod(ne) // block * type_size  # exact Python ints: no overflow
            infos.append((name, tuple(reversed(ne)), qtype, offset, nbytes))

        alignment = self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1) or alignment > 1 << 20:
            raise WeightsError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        for name, shape, qtype, offset, nbytes in infos:
            if name in self.tensors:
                raise WeightsError(f"{self.path}: tensor {name!r} appears twice")
            if offset % alignment:
                raise WeightsError(f"{self.path}: tensor {name!r} data is misaligned")
            start = data_start + offset
            if start + nbytes > size:
                raise WeightsError(
                    f"{self.path}: tensor {name!r} ({nbytes} bytes at offset {start}) extends "
                    f"past the end of the {size}-byte file (truncated or corrupt)"
                )
            self.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)

    def tensor(self, name: str, dtype: torch.dtype, row_order: np.ndarray | None = None) -> torch.Tensor:
        """Tensor `name` as a fresh `dtype` tensor in HF layout; `row_order` picks its rows.
        Refuses NaN or infinite values: no real model has them, a corrupt block produces them."""
        info = self.tensors[name]
        n = math.prod(info.shape)
        if n == 0:
            return torch.empty(info.shape, dtype=dtype)
        if info.qtype in _FLOAT_TORCH:
            src = torch.frombuffer(self._map, dtype=_FLOAT_TORCH[info.qtype], count=n, offset=info.offset)
            src = src.reshape(info.shape)
            if row_order is not None:
                out = src[torch.from_numpy(row_order)].to(dtype)  # indexing already copied
            else:
                out = src.to(dtype, copy=True)
        else:
            block, type_size = GGML_QUANT_SIZES[info.qtype]
            rows = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
            rows = rows.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
            if row_order is not None:
                rows = rows[row_order]
            try:
                with np.errstate(all="ignore"):  # corrupt scales: reported below, not as warnings
                    values = gguf.quants.dequantize(rows, info.qtype)  # float32, HF shape
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} is {info.qtype.name}, which foveal cannot dequantize"
                ) from None
            out = torch.from_numpy(values.reshape(info.shape))
            out = out if dtype == torch.float32 else out.to(dtype)
        # one pass, no temporary: a float64 sum is finite exactly when every value is
        if not math.isfinite(out.sum(dtype=torch.float64)):
            raise WeightsError(f"{self.path}: tensor {name!r} holds NaN or infinite values (corrupt file?)")
        return out


_SHARD_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


class SplitGGUF:
    """A model `gguf-split` wrote as `<name>-0000i-of-0000N.gguf`: the first file holds the
    metadata, every file its own tensors. Same reading interface as GGUFFile."""

    def __init__(self, shards: list[GGUFFile]):
        self.shards, self.path, self.metadata = shards, shards[0].path, shards[0].metadata
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, GGUFFile] = {}
        for shard in shards:
            for name, info in shard.tensors.items():
                if name in self.tensors:
                    raise WeightsError(f"{shard.path}: tensor {name!r} is also in another shard")
                self.tensors[name], self._owner[name] = info, shard

    def tensor(self, name: str, dtype: torch.dtype, row_order: np.ndarray | None = None) -> torch.Tensor:
        return self._owner[name].tensor(name, dtype, row_order)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> SplitGGUF:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_int(value: Any, expected: int) -> bool:
    # metadata may hold any type (a numpy array compares elementwise): check the type first
    return isinstance(value, int) and not isinstance(value, bool) and value == expected


def open_gguf(path: str | Path) -> GGUFFile | SplitGGUF:
    """Open a GGUF file, or all shards of a split model given its first shard."""
    first = GGUFFile(path)
    count = first.metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    if _is_int(count, 1):
        return first
    shards = [first]
    try:
        match = _SHARD_NAME.fullmatch(first.path.name)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 < count <= 9999 or match is None \
                or int(match[2]) != 1 \
                or int(match[3]) != count:
            raise WeightsError(
                f"{first.path}: split.count is {count!r}"[:200] + "; open a split model by its first "
                "shard, named <name>-00001-of-<count, 5 digits>.gguf"
            )
        for i in range(2, count + 1):
            shard_path = first.path.with_name(f"{match[1]}-{i:05d}-of-{count:05d}.gguf")
            if not shard_path.is_file():
                raise WeightsError(f"{first.path} is split in {count} files; {shard_path.name} is missing")
            shards.append(GGUFFile(shard_path))
            if not _is_int(shards[-1].metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_NO), i - 1):
                raise WeightsError(f"{shard_path}: split.no does not say it is shard {i} of {count}")
        model = SplitGGUF(shards)
        expected = first.metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(model.tensors))
        if not _is_int(expected, len(model.tensors)):
            raise WeightsError(f"{first.path}: the shards hold {len(model.tensors)} tensors, not {expected!r}"[:300])
        return model
    except BaseException:
        for shard in shards:
            shard.close()
        raise


# --- public API -------------------------------------------------------------------------
def read_gguf(
    text_path: str | Path,
    mmproj_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> HFCheckpoint:
    """Read a llama.cpp text model GGUF (and its mmproj, if given) into an HFCheckpoint.

    Quantized tensors are dequantized one at a time to `dtype` (bfloat16 or float32).
    Raises WeightsError for a corrupt, truncated or inconsistent file and
    UnsupportedModelError for an architecture foveal does not run.
    """
    from foveal.weights.gguf_read import read_gguf as _read

    return _read(text_path, mmproj_path, dtype=dtype)


def write_gguf(
    ckpt: HFCheckpoint, out_dir: str | Path, *, type: str = "f16",  # noqa: A002 - the CLI's name
    head_type: str | None = None,
) -> tuple[Path, Path | None]:
    """Write `ckpt` as llama.cpp files in `out_dir`: the text model and, for a VLM, the mmproj.

    `type` is the text model's tensor type: f32, f16, q8_0 or q4_0 (norms and other 1-D
    tensors stay f32, as llama.cpp keeps them). `head_type` is the output head's (or the tied
    embedding's) type; by default f16 under q8_0 and q8_0 under q4_0, else `type`.
    The mmproj is f32 for `type="f32"`, else f16. Returns (text_path, mmproj_path or None).
    """
    from foveal.weights.gguf_write import write_gguf as _write

    return _write(ckpt, out_dir, type=type, head_type=head_type)


def read_hf_folder(path: str | Path) -> HFCheckpoint:
    """Read an HF folder (config, safetensors shards, tokenizer, chat template, image
    processor config) into an HFCheckpoint with legacy llava-hf tensor names."""
    from foveal.weights.gguf_write import read_hf_folder as _read_folder

    return _read_folder(path)


__all__ = ["HFCheckpoint", "read_gguf", "write_gguf", "read_hf_folder"]
