"""The public Python API: `foveal.load(ref)` -> `VLM` with `.generate()` and `.stream()`.

Design decisions:
- `load` builds the model on the meta device and assigns checkpoint tensors (mmap views, or
  converted one at a time), so a model is never held twice.
- The model's family (models/registry.py) maps its config, builds its model and makes its
  processor; nothing here knows one family from another.
- One request = messages -> the family's processor (images decoded and validated, videos probed, prompt ids
  with image slots, RoPE positions) -> engine (vision encode, skipped on a content-hash cache
  hit; prefill/decode). Timings of each stage travel in `result.stats`.
- bfloat16 is the default on CPUs with native bf16 support (AVX-512-BF16 / AMX) and on GPUs
  that have it; float32 otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import config as C
from .engine.constrain import json_constraint
from .engine.generate import Chunk, Engine, GenerationResult, Stats
from .engine.sampling import SamplingOptions
from .engine.thinking import ThinkingSplitter
from .errors import ConfigError, FovealError, PromptError
from .models import registry
from .models.families.llava import image_processor_of
from .models.interface import Checkpoint
from .models.placement import check_gpu_layers, device_of, place
from .processing.images import ImageLimits
from .processing.prompt import Tokenizer, find_chat_template
from .weights.safetensors import load_into, open_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_dtype(device: str) -> torch.dtype:
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    try:
        dev = torch.device(device) if device else torch.device("cpu")
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    return str(dev)


@contextmanager
def no_init_weights():
    """Skip nn.init while building on the meta device: the values are overwritten by the checkpoint,
    and random init of meta tensors costs about a second (it imports sympy) for nothing."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_",
             "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


class VLM:
    """A loaded vision-language model (or text LM) ready to answer, of any family."""

    def __init__(self, model, cfg, family, processor, engine: Engine, tokenizer: Tokenizer, path: Path,
                 dtype: torch.dtype, device: str, image_limits: ImageLimits, load_s: float):
        self.model, self.config, self.family, self.processor = model, cfg, family, processor
        self.engine, self.tokenizer = engine, tokenizer
        self.path, self.dtype, self.device = path, dtype, device
        self.image_limits = image_limits
        self.load_s = load_s

    # ---- information -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def prompt(self):
        """The prompt builder (its `.template` is the chat template in use)."""
        return self.processor.prompt

    @property
    def image_config(self):
        return self.processor.image_config

    @property
    def _image_cache(self):
        return self.engine.image_cache

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def describe(self) -> dict:
        """What the family says of this model (architecture, towers, image tokens), for info and /api/show."""
        return self.family.describe(self.config, self.processor)

    @property
    def image_tokens_per_image(self) -> int:
        """Tokens per image: a fixed-size model's; an anyres (LLaVA-NeXT) model's base view only; a
        dynamic-resolution model's at its default size (see `image_tokens` and `max_image_tokens`)."""
        return self.describe()["image_tokens_per_image"]

    @property
    def max_image_tokens(self) -> int:
        return self.describe()["max_image_tokens"]

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens an image of (height, width) `size` takes in a prompt."""
        return self.processor.image_tokens(size)

    def parameter_counts(self) -> dict[str, int]:
        parts = {"vision": 0, "projector": 0, "language_model": 0}
        seen = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            parts[self.model.parts.get(name.split(".", 1)[0], "language_model")] += p.numel()
        return parts

    def weight_bytes(self, device_type: str | None = None) -> int:
        """Bytes of weights (no KV cache); with device_type ("cpu", "cuda"), only those held there (a model
        split by --gpu-layers)."""
        seen, total = set(), 0
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if id(t) in seen or t.device.type == "meta" or ".kv_cache." in name:
                continue
            seen.add(id(t))
            if device_type is None or t.device.type == device_type:
                total += t.numel() * t.element_size()
        return total

    # ---- requests ----------------------------------------------------------------------
    def _prepare(self, messages, stats: Stats, budget=None):
        t0 = time.perf_counter()
        prepared = self.processor.prepare(messages, self.image_limits, budget)
        videos = [c for c in prepared.images if c.kind == "video"]
        stats.images = len(prepared.images) - len(videos)
        stats.videos, stats.video_frames = len(videos), sum(c.frames for c in videos)
        stats.video_tokens = sum(c.n_tokens for c in videos)
        stats.preprocess_s = time.perf_counter() - t0
        embeds = self.engine.image_embeds(prepared.images, self.processor, stats)
        return prepared, embeds

    def stream(self, messages, *, cancel=None, format=None, **options):
        """Yield `Chunk`s of text as soon as they decode; the last has done=True and stats. A model that
        opens its output with a <think> tag has that thought in `chunk.thinking`, never in `chunk.text`.
        format: "json" (one JSON object) or a JSON schema dict, enforced by constrained decoding; with
        finish_reason "length" the text may be incomplete JSON."""
        opts = SamplingOptions.from_kwargs(**options)
        constraint = json_constraint(format, self.tokenizer, self.config.text.vocab_size, self.engine.eos_ids)
        stats = Stats()
        t0 = time.perf_counter()
        p, embeds = self._prepare(messages, stats, opts.image_budget)
        stats.total_s = time.perf_counter() - t0
        splitter = ThinkingSplitter()
        keys = [(c.key, c.n_tokens) for c in p.images]
        # positions only where the family computes its own (M-RoPE): otherwise the engine's 0..T-1
        positions = {} if p.positions is None else {"positions": p.positions, "next_position": p.next_position}
        for chunk in self.engine.stream(p.input_ids, p.image_mask, embeds, keys, opts, stats, cancel, constraint,
                                        **positions):
            chunk.thinking, chunk.text = splitter.push(chunk.text)
            if chunk.done:
                thinking, text = splitter.flush()
                chunk.thinking, chunk.text = chunk.thinking + thinking, chunk.text + text
            yield chunk

    def generate(self, messages, *, format=None, **options) -> GenerationResult:
        text, thinking, ids, last = [], [], [], None
        for chunk in self.stream(messages, format=format, **options):
            text.append(chunk.text)
            thinking.append(chunk.thinking)
            ids += chunk.token_ids
            last = chunk
        return GenerationResult("".join(text), ids, last.finish_reason, last.stats, "".join(thinking))

    def prompt_logits(self, messages, *, min_image_tokens=None, max_image_tokens=None) -> tuple[list[int], torch.Tensor]:
        """(prompt token ids, logits (T, V) at every position) for messages, without generating."""
        budget = SamplingOptions.from_kwargs(min_image_tokens=min_image_tokens,
                                             max_image_tokens=max_image_tokens).image_budget
        p, embeds = self._prepare(messages, Stats(), budget)
        return p.input_ids, self.engine.prompt_logits(p.input_ids, p.image_mask, embeds, p.positions)

    def count_tokens(self, messages, *, min_image_tokens=None, max_image_tokens=None) -> int:
        budget = SamplingOptions.from_kwargs(min_image_tokens=min_image_tokens,
                                             max_image_tokens=max_image_tokens).image_budget
        return self.processor.count_tokens(messages, self.image_limits, budget)

    def unload(self) -> None:
        self.engine.unload()


# ---- loading ---------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _from_folder(folder: Path) -> Checkpoint:
    raw = C.load_config_file(folder / "config.json")
    tokenizer = Tokenizer.from_folder(folder)
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
    return Checkpoint(folder, raw, open_checkpoint(folder), tokenizer, find_chat_template(folder, tokenizer.config),
                      image_processor_of(folder), gen)


def _from_gguf(path: Path, mmproj: Path | None, dtype: torch.dtype, template: str | None) -> Checkpoint:
    from tokenizers import Tokenizer as HFTokenizer
    from .weights.gguf import read_gguf
    from .weights.safetensors import MemoryCheckpoint
    ckpt = read_gguf(path, mmproj, dtype=dtype if dtype != torch.float16 else torch.float32)
    tokenizer = Tokenizer(HFTokenizer.from_str(ckpt.tokenizer_json), ckpt.tokenizer_config)
    jinja = ckpt.tokenizer_config.get("chat_template") or None
    return Checkpoint(path, ckpt.config, MemoryCheckpoint(str(path), ckpt.tensors).sources(), tokenizer, jinja,
                      ckpt.preprocessor_config, {})


def _locate(ref, mmproj, dtype) -> Checkpoint:
    if ref is None:
        from .bundled import bundled_model_path
        ref = bundled_model_path()
    path = Path(ref).expanduser() if isinstance(ref, (str, Path)) else None
    if path is not None and path.is_dir() and (path / "config.json").exists() and mmproj is None:
        return _from_folder(path)
    from .weights.resolve import resolve
    found = resolve(ref, mmproj=mmproj)
    if found.kind == "hf":
        return _from_folder(found.path)
    return _from_gguf(found.path, found.mmproj, dtype, found.template)


def load(ref=None, *, device: str = "cpu", dtype=None, quant=None, vision_tower=None, mmproj=None,
         context_length: int | None = None, image_limits: ImageLimits | None = None,
         image_mode: str | None = None, gpu_layers: int | None = None, compile: bool = False) -> VLM:
    """Load a model from a reference: an HF folder (LLaVA, original LLaVA + CLIP tower, text LM),
    a GGUF file (+ mmproj), `hf:ORG/NAME`, `ollama:NAME[:TAG]`, `lmstudio:PUB/REPO`.
    gpu_layers (device="cuda"): only the last N decoder layers (with the vision tower, projector and
    head) on the GPU, the rest on the CPU, as `foveal plan` suggests for a GPU too small for the model.
    compile: decode steps through torch.compile (~10 % faster decode on CPU; loading waits for the
    compilation, tens of seconds, cached on disk for later processes)."""
    t0 = time.perf_counter()
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be True or False, got {compile!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ck = _locate(ref, mmproj, dtype)
    family = registry.family_for(ck.raw_config)
    cfg = family.config(ck.raw_config)
    offload = check_gpu_layers(gpu_layers, device, cfg.text.num_hidden_layers)
    family.complete(cfg, ck, vision_tower)
    from . import quant as Q
    with torch.device("meta"), no_init_weights():
        model = family.build(cfg)
        saved_quant, want_quant = Q.before_load(model, ck.raw_config, dtype, quant)
    sources = ck.sources
    if want_quant:      # quantize layer by layer from the file; a tied head waits for its embedding
        sources = Q.quantize_from_checkpoint(model, sources, dtype, *want_quant,
                                             skip=frozenset({"lm_head"} if cfg.text.tie_word_embeddings else ()))
    tied = cfg.text.tie_word_embeddings and not Q.head_is_quantized(model)
    optional = {"lm_head.weight"} if tied else set()
    n_layers = cfg.text.num_hidden_layers
    where = device if offload is None else (lambda name: device_of(name, n_layers, offload, device))
    unused = load_into(model, sources, dtype, where, optional=optional)
    if unused:
        log.info("%s: %d checkpoint tensor(s) not used by this model (e.g. %s)", ck.path, len(unused), unused[0])
    if tied or not cfg.text.tie_word_embeddings:
        model.tie_weights()
    if offload is not None:
        place(model, device, offload)       # layers quantized on the CPU, a tied head's GPU copy
    Q.after_load(model, saved_quant, want_quant)
    model.init_buffers()
    model.eval().requires_grad_(False)

    processor = family.processor(cfg, ck, image_mode)
    tokenizer = ck.tokenizer
    ctx = cfg.text.max_position_embeddings
    if context_length is not None:
        if not isinstance(context_length, int) or context_length < 16:
            raise ConfigError(f"context_length must be an integer >= 16, got {context_length!r}")
        ctx = context_length
    eos = set(cfg.text.eos_token_id) | tokenizer.eos_ids()
    gen_eos = ck.generation_config.get("eos_token_id")
    eos |= set([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    engine = Engine(model, tokenizer, eos, ctx, dtype)
    if compile:
        model.compile_decode()
        engine.warm_up()        # compile now, not in the first request (a server's client would time out)
    vlm = VLM(model, cfg, family, processor, engine, tokenizer, ck.path, dtype, device,
              image_limits or ImageLimits(), time.perf_counter() - t0)
    vlm.unused_tensors = unused
    vlm.raw_config = ck.raw_config
    return vlm


__all__ = ["load", "VLM", "Chunk", "GenerationResult", "Stats", "FovealError", "PromptError"]
