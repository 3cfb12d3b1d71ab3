"""The public Python API: `foveal.load(ref)` -> `VLM` with `.generate()` and `.stream()`.

Design decisions:
- `load` builds the model on the meta device and assigns checkpoint tensors (mmap views, or
  converted one at a time), so a model is never held twice.
- One request = messages -> images decoded and validated -> prompt ids with image slots ->
  vision encode (skipped on a content-hash cache hit) -> engine prefill/decode. Timings of
  each stage travel in `result.stats`.
- bfloat16 is the default on CPUs with native bf16 support (AVX-512-BF16 / AMX) and on GPUs
  that have it; float32 otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import config as C
from .engine.constrain import json_constraint
from .engine.generate import Chunk, Engine, GenerationResult, Stats
from .engine.sampling import SamplingOptions
from .engine.thinking import ThinkingSplitter
from .errors import ConfigError, FovealError, ModelNotFoundError, PromptError
from .models.placement import check_gpu_layers, device_of, place
from .models.vlm import VisionLanguageModel
from .processing.images import ImageLimits, ImageProcessorConfig, load_image, preprocess_batch, preprocess_views
from .processing.prompt import IMAGE_PLACEHOLDER, PromptBuilder, Tokenizer, find_chat_template, normalize_messages
from .weights.safetensors import load_into, open_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
IMAGE_CACHE_SIZE = 16


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
    """A loaded vision-language model (or text LM) ready to answer."""

    def __init__(self, model: VisionLanguageModel, cfg: C.VLMConfig, tokenizer: Tokenizer, prompt: PromptBuilder,
                 image_config: ImageProcessorConfig | None, engine: Engine, path: Path, dtype: torch.dtype,
                 device: str, image_limits: ImageLimits, load_s: float):
        self.model, self.config, self.tokenizer, self.prompt = model, cfg, tokenizer, prompt
        self.image_config, self.engine = image_config, engine
        self.path, self.dtype, self.device = path, dtype, device
        self.image_limits = image_limits
        self.load_s = load_s
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ---- information -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def image_tokens_per_image(self) -> int:
        """Tokens per image; an anyres (LLaVA-NeXT) model's base view only (see `max_image_tokens`)."""
        return self.config.image_tokens_per_image

    @property
    def max_image_tokens(self) -> int:
        return self.config.max_image_tokens

    def parameter_counts(self) -> dict[str, int]:
        parts = {"vision": 0, "projector": 0, "language_model": 0}
        seen = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = ("vision" if name.startswith("vision_tower.") else
                   "projector" if name.startswith("multi_modal_projector.") else "language_model")
            parts[key] += p.numel()
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
    def _prepare(self, messages, stats: Stats):
        t0 = time.perf_counter()
        template_messages, image_sources = normalize_messages(messages, self.prompt.template)
        inputs = self.prompt.build(template_messages, n_images=len(image_sources))   # prompt errors before decoding
        loaded = [load_image(src, self.image_limits) for src in image_sources]
        counts = [self.config.image_tokens((im.height, im.width)) for im in loaded]
        if self.config.anyres:
            inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts)
        stats.images = len(loaded)
        todo = list({im.sha256: im for im in loaded if im.sha256 not in self._image_cache}.values())
        pixels = None
        if todo and not self.config.anyres:
            pixels = preprocess_batch([im.image for im in todo], self.image_config)
        elif todo:
            pixels = [preprocess_views(im.image, self.image_config) for im in todo]
        stats.preprocess_s = time.perf_counter() - t0
        embeds = None
        if loaded:
            t1 = time.perf_counter()
            if todo:
                with torch.inference_mode():
                    if self.config.anyres:     # one image at a time: each has its own tile count
                        new = [self.model.encode_anyres(p.to(self.model.vision_device), (im.height, im.width))
                               for im, p in zip(todo, pixels)]
                    else:
                        new = self.model.encode_images(pixels.to(self.model.vision_device))
                for im, e in zip(todo, new):
                    self._image_cache[im.sha256] = e
            embeds = torch.cat([self._image_cache[im.sha256] for im in loaded])[None]    # (1, image tokens, D)
            for im in loaded:
                self._image_cache.move_to_end(im.sha256)
            while len(self._image_cache) > IMAGE_CACHE_SIZE:
                self._image_cache.popitem(last=False)
            stats.encode_s = time.perf_counter() - t1
        return inputs, embeds, [(im.sha256, n) for im, n in zip(loaded, counts)]

    def stream(self, messages, *, cancel=None, format=None, **options):
        """Yield `Chunk`s of text as soon as they decode; the last has done=True and stats. A model that
        opens its output with a <think> tag has that thought in `chunk.thinking`, never in `chunk.text`.
        format: "json" (one JSON object) or a JSON schema dict, enforced by constrained decoding; with
        finish_reason "length" the text may be incomplete JSON."""
        opts = SamplingOptions.from_kwargs(**options)
        constraint = json_constraint(format, self.tokenizer, self.config.text.vocab_size, self.engine.eos_ids)
        stats = Stats()
        t0 = time.perf_counter()
        inputs, embeds, keys = self._prepare(messages, stats)
        stats.total_s = time.perf_counter() - t0
        splitter = ThinkingSplitter()
        for chunk in self.engine.stream(inputs.input_ids, inputs.image_mask, embeds, keys, opts, stats, cancel,
                                        constraint):
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

    def prompt_logits(self, messages) -> tuple[list[int], torch.Tensor]:
        """(prompt token ids, logits (T, V) at every position) for messages, without generating."""
        inputs, embeds, _ = self._prepare(messages, Stats())
        return inputs.input_ids, self.engine.prompt_logits(inputs.input_ids, inputs.image_mask, embeds)

    def count_tokens(self, messages) -> int:
        template_messages, image_sources = normalize_messages(messages, self.prompt.template)
        counts = None
        if self.config.anyres:      # the count depends on each image's size
            counts = [self.config.image_tokens((im.height, im.width))
                      for im in (load_image(src, self.image_limits) for src in image_sources)]
        return len(self.prompt.build(template_messages, n_images=len(image_sources), image_tokens=counts).input_ids)

    def unload(self) -> None:
        self.engine.reset()
        self._image_cache.clear()


# ---- loading ---------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _find_tower(cfg: C.VLMConfig, folder: Path, vision_tower) -> Path:
    candidates = [Path(vision_tower)] if vision_tower else []
    name = cfg.vision_tower_path
    candidates += [Path(name), folder / name, folder / Path(name).name]
    for c in candidates:
        if (c / "config.json").exists():
            return c
    try:    # an HF hub id already in the local cache
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:   # noqa: BLE001 - any failure means "not in the cache"
        pass
    raise ModelNotFoundError(f"the vision tower {name!r} named by mm_vision_tower was not found (looked in "
                             f"{', '.join(str(c) for c in candidates)} and the Hugging Face cache); pass "
                             f"vision_tower=PATH")


def _from_folder_image_processor(folder: Path) -> dict | None:
    if (folder / "preprocessor_config.json").exists():
        d = _read_json(folder / "preprocessor_config.json")
        return d.get("image_processor", d)
    if (folder / "processor_config.json").exists():      # newer transformers nest it here; else it only
        return _read_json(folder / "processor_config.json").get("image_processor")   # holds patch_size & co.
    return None


def _image_config(cfg: C.VLMConfig, image_processor: dict | None, raw: dict,
                  image_mode: str | None) -> ImageProcessorConfig | None:
    if cfg.vision is None:
        return None
    if image_processor is not None:
        ipc = ImageProcessorConfig.from_hf(image_processor)
    else:
        ipc = ImageProcessorConfig.for_vision("siglip" if cfg.vision.is_siglip else "clip", cfg.vision.image_size)
    if cfg.anyres:
        if image_mode is not None:
            raise ConfigError(f"image_mode {image_mode!r} does not apply to an anyres (LLaVA-NeXT) model: "
                              f"it tiles each image at its own aspect")
        if ipc.grid_pinpoints is not None and ipc.grid_pinpoints != cfg.image_grid_pinpoints:
            raise ConfigError(f"the image processor's image_grid_pinpoints {ipc.grid_pinpoints} differ from "
                              f"config.json's {cfg.image_grid_pinpoints}")
        return replace(ipc, mode="crop", grid_pinpoints=cfg.image_grid_pinpoints)
    if raw.get("image_aspect_ratio") == "pad":     # original LLaVA-1.5 trained on padded squares
        ipc.mode = "pad"
    if image_mode is not None:
        if image_mode not in ("crop", "pad", "resize"):
            raise ConfigError(f"image_mode {image_mode!r} is not supported; use crop, pad or resize")
        ipc.mode = image_mode
    return ipc


@dataclass
class _Checkpoint:
    """What load() needs, wherever it came from (HF folder or GGUF)."""
    path: Path
    raw_config: dict
    sources: dict
    tokenizer: Tokenizer
    template: str | None
    image_processor: dict | None
    generation_config: dict


def _from_folder(folder: Path) -> _Checkpoint:
    raw = C.load_config_file(folder / "config.json")
    tokenizer = Tokenizer.from_folder(folder)
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
    return _Checkpoint(folder, raw, open_checkpoint(folder), tokenizer, find_chat_template(folder, tokenizer.config),
                       _from_folder_image_processor(folder), gen)


def _from_gguf(path: Path, mmproj: Path | None, dtype: torch.dtype, template: str | None) -> _Checkpoint:
    from tokenizers import Tokenizer as HFTokenizer
    from .weights.gguf import read_gguf
    from .weights.safetensors import MemoryCheckpoint
    ckpt = read_gguf(path, mmproj, dtype=dtype if dtype != torch.float16 else torch.float32)
    tokenizer = Tokenizer(HFTokenizer.from_str(ckpt.tokenizer_json), ckpt.tokenizer_config)
    jinja = ckpt.tokenizer_config.get("chat_template") or None
    return _Checkpoint(path, ckpt.config, MemoryCheckpoint(str(path), ckpt.tensors).sources(), tokenizer, jinja,
                       ckpt.preprocessor_config, {})


def _locate(ref, mmproj, dtype) -> _Checkpoint:
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
    cfg = C.config_from_hf(ck.raw_config)
    offload = check_gpu_layers(gpu_layers, device, cfg.text.num_hidden_layers)
    sources = ck.sources
    tower = None
    if cfg.layout == "original":
        tower = _find_tower(cfg, ck.path, vision_tower)
        C.attach_vision(cfg, C.load_config_file(tower / "config.json"))
        sources.update({k: v for k, v in open_checkpoint(tower).items() if k.startswith("vision_tower.")})
    from . import quant as Q
    with torch.device("meta"), no_init_weights():
        model = VisionLanguageModel(cfg)
        saved_quant, want_quant = Q.before_load(model, ck.raw_config, dtype, quant)
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
    model.language_model.init_rope(model.input_device)
    model.eval().requires_grad_(False)

    tokenizer = ck.tokenizer
    image_token = tokenizer.config.get("image_token") or IMAGE_PLACEHOLDER
    image_token_id = cfg.image_token_id
    if cfg.layout == "llava-hf" and tokenizer.token_id(image_token) != image_token_id:
        found = tokenizer.tok.id_to_token(image_token_id) if image_token_id is not None else None
        if found is None:
            raise ConfigError(f"config image_token_index {image_token_id} is not in the tokenizer's vocabulary")
        image_token = found
    prompt = PromptBuilder(tokenizer, ck.template, image_token_id if cfg.layout == "llava-hf" else None,
                           cfg.image_tokens_per_image, image_token)
    image_processor = ck.image_processor
    if tower is not None:
        image_processor = _from_folder_image_processor(tower)
    image_config = _image_config(cfg, image_processor, ck.raw_config, image_mode)
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
    vlm = VLM(model, cfg, tokenizer, prompt, image_config, engine, ck.path, dtype, device,
              image_limits or ImageLimits(), time.perf_counter() - t0)
    vlm.unused_tensors = unused
    return vlm


__all__ = ["load", "VLM", "Chunk", "GenerationResult", "Stats", "FovealError", "PromptError"]
