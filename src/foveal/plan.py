"""Memory planning: "will this model run here?" before any weight is read.

    p = plan("llava-1.5-7b/config.json", device="cuda", memory="8GiB", ctx=4096, images=1, quant="int4")
    p.total, p.fits, p.margin, p.gpu_layers, print(p.report())

Design decisions:
- Parameter counts come from the model itself, built on the meta device from the config (no
  weights read, no memory used), so every architecture foveal runs is counted exactly, vision
  layers beyond the selected feature layer (never loaded) included out, a tied head once.
- Quantized sizes follow the quant module's formats and its choice of modules
  (`quant.plan_modules`): int8 = 1 byte per weight + one scale per output row; int4 = half a
  byte + a scale and a zero per group; the embedding stays in float, and a tied head that is
  quantized becomes its own tensor.
- The KV cache is what the engine allocates: 2 (K and V) * layers * kv_heads * head_dim * tokens
  * bytes. Activations are the larger of two peaks that never overlap: the vision encode (all
  hidden states of the tower are kept, for feature-layer selection) and the LM prefill (one
  layer's working set for `ctx` tokens, the (T, S) mask, logits of the last position only).
  The image embeddings live through prefill (and in the engine's image cache).
- The runtime overhead (interpreter + torch + libraries + kernel caches) was measured, not
  guessed: the peak RSS of loading and running the tiny random model (`measure_overhead()`
  re-measures it). On CUDA it is the CUDA context and cuBLAS workspace, in GPU memory.
- Quantizing a float checkpoint at load (`load(..., quant=)`) builds one layer at a time from the
  file (`quant.quantize_from_checkpoint`): it peaks at the quantized model so far plus one float
  matrix (a converted copy when the file's dtype differs) and float32 temporaries of 4096 of its
  rows. `load_peak` counts it; the verdict uses the larger of it and the steady state
  (llava-0.5b-shaped, measured peak RSS after loading, bf16 file: int8 1.10 GiB, int4 1.15 GiB;
  before this, when the whole float model was loaded first: 3.2 and 3.9 GiB).
- A GPU that is too small gets a `--gpu-layers N` suggestion: the vision tower, the projector,
  the head, the activations and the overhead stay on the GPU, the token embedding stays on
  the CPU (as llama.cpp does), and N decoder layers with their share of the KV cache fit in
  what remains. Splitting the model is the loader's job, not this module's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, ContextLengthError, MemoryBudgetError

MiB, GiB = 2**20, 2**30
# Peak RSS of `load()` + one `generate()` with an image on foveal's tiny random model (a few MB of
# weights), torch 2.13 CPU, measured with measure_overhead(): 256 MiB in float32, 267 MiB in
# bfloat16. The larger is used.
CPU_OVERHEAD_BYTES = 268 * MiB
# CUDA context + cuBLAS/cuDNN workspaces + the caching allocator's slack, in GPU memory.
CUDA_OVERHEAD_BYTES = 600 * MiB
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": MiB, "mb": 10**6, "mib": MiB,
              "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


@dataclass
class Plan:
    """Memory of each part in bytes, for one device, context, image count, quantization and dtype."""
    device: str
    dtype: str
    quant: str
    ctx: int
    images: int
    memory: int | None                 # the budget; None when unknown (no --memory and no way to ask)
    image_tokens_per_image: int
    parameters: dict[str, int]         # vision, projector, language_model (a tied head counted once)
    vision: int
    projector: int
    embedding: int
    layers: int                        # all decoder layers + the final norm
    head: int                          # 0 when tied to the embedding and not quantized
    kv_cache: int
    vision_activations: int            # peak of encoding `images` images at once
    prefill_activations: int           # peak of prefilling `ctx` tokens (image embeddings included)
    overhead: int
    n_layers: int
    layer_bytes: int                   # one decoder layer's weights
    load_peak: int = 0                 # quantizing at load: weights + one float layer + its temporaries
    notes: list[str] = field(default_factory=list)
    gpu_layers: int | None = None      # set when a GPU budget is too small for the whole model

    @property
    def lm_weights(self) -> int:
        return self.embedding + self.layers + self.head

    @property
    def weights(self) -> int:
        return self.vision + self.projector + self.lm_weights

    @property
    def activations(self) -> int:
        return max(self.vision_activations, self.prefill_activations)

    @property
    def kv_per_token(self) -> int:
        return self.kv_cache // self.ctx if self.ctx else 0

    @property
    def total(self) -> int:
        """Memory while answering: weights + KV cache + the larger activation peak + overhead."""
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def peak(self) -> int:
        """The most the process ever needs: `total`, or the load when it quantizes on the fly."""
        return max(self.total, self.load_peak)

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.peak <= self.memory

    @property
    def margin(self) -> int | None:
        """Budget left over at the peak (negative: how much is missing)."""
        return None if self.memory is None else self.memory - self.peak

    def parts(self) -> list[tuple[str, int]]:
        return [("vision weights", self.vision), ("projector", self.projector),
                ("LM embedding", self.embedding), ("LM layers", self.layers), ("LM head", self.head),
                ("KV cache", self.kv_cache), ("activations", self.activations),
                ("runtime overhead", self.overhead)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d |= {"lm_weights": self.lm_weights, "weights": self.weights, "activations": self.activations,
              "kv_per_token": self.kv_per_token, "total": self.total, "peak": self.peak, "fits": self.fits,
              "margin": self.margin}
        return d

    def report(self) -> str:
        lines = [f"memory plan: {self.device}, {self.dtype}, quant {self.quant}, context {self.ctx} tokens, "
                 f"{self.images} image(s) x {self.image_tokens_per_image} tokens"]
        p = self.parameters
        lines.append(f"parameters: vision {_count(p['vision'])}, projector {_count(p['projector'])}, "
                     f"language model {_count(p['language_model'])}")
        for name, n in self.parts():
            extra = ""
            if name == "KV cache":
                extra = f"  ({self.kv_per_token / 1024:.0f} KiB/token)"
            elif name == "activations":
                extra = (f"  (vision encode {human_bytes(self.vision_activations)}, prefill "
                         f"{human_bytes(self.prefill_activations)})")
            elif name == "LM head" and n == 0:
                extra = "  (tied to the embedding)"
            lines.append(f"  {name:<18}{human_bytes(n):>12}{extra}")
        lines.append(f"  {'total':<18}{human_bytes(self.total):>12}")
        if self.load_peak > self.total:
            lines.append(f"  {'load peak':<18}{human_bytes(self.load_peak):>12}  (quantizing at load: one float "
                         f"layer and its temporaries on top of the quantized weights; `foveal quantize` once and "
                         f"load the result to avoid it)")
        if self.memory is None:
            lines.append("verdict: unknown (no budget: pass --memory)")
        elif self.fits:
            lines.append(f"verdict: fits in {human_bytes(self.memory)} with {human_bytes(self.margin)} to spare")
        else:
            lines.append(f"verdict: does NOT fit in {human_bytes(self.memory)}: {human_bytes(-self.margin)} short")
        if self.gpu_layers is not None:
            if self.gpu_layers == 0:
                lines.append("  not even the vision tower, head and activations fit on this GPU: run on the CPU")
            else:
                rest = self.n_layers - self.gpu_layers
                cpu = self.embedding + rest * (self.layer_bytes + self.kv_cache // max(self.n_layers, 1))
                lines.append(f"  suggestion: --gpu-layers {self.gpu_layers} (of {self.n_layers}); the other {rest} "
                             f"layers and the embedding need {human_bytes(cpu)} of CPU memory")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- parsing ----------------------------------------------------------------------------------
def parse_size(value) -> int:
    """'8GiB', '8 GB', '512M', '1.5g', 1000000 -> bytes (G/M/K without 'B' are binary)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in SIZE_UNITS:
            raise ConfigError(f"memory size {value!r} is not understood; use a number with a unit, e.g. 8GiB, "
                              f"16GB, 512MiB")
        n = float(m.group(1)) * SIZE_UNITS[unit]
    if n <= 0:
        raise ConfigError(f"memory size {value!r} must be positive")
    return int(n)


def human_bytes(n: int) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _parse_quant(quant) -> tuple[str, int | None]:
    if quant in (None, "", "none", "float"):
        return "none", None
    from .quant import parse_quant
    return parse_quant(quant)


def _dtype_name(dtype, device: str) -> str:
    import torch
    if dtype is None or dtype == "auto":
        if device == "cuda":
            return "bfloat16"   # every GPU foveal targets has it; float16 is the same size anyway
        from .api import default_dtype
        dtype = default_dtype("cpu")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def _load_config(cfg_or_path):
    """A VLMConfig, a config.json dict, a config.json path or a model folder -> (family, config, notes, raw,
    the image processor's saved settings or None)."""
    from . import config as C
    from .models.families import llava
    if isinstance(cfg_or_path, C.VLMConfig):
        return llava, cfg_or_path, [], {}, None
    if isinstance(cfg_or_path, dict):
        raw, folder = cfg_or_path, None
    else:
        path = Path(cfg_or_path).expanduser()
        if path.is_dir():
            folder, path = path, path / "config.json"
        else:
            folder = path.parent
        if not path.exists():
            raise ConfigError(f"{cfg_or_path}: no config.json there; give a model folder or a config.json file")
        raw = C.load_config_file(path)
    from .models import registry
    family = registry.family_for(raw)
    cfg = family.config(raw)
    notes = family.plan_complete(cfg, folder)
    return family, cfg, notes, raw, llava.image_processor_of(folder) if folder is not None else None


# ---- counting ---------------------------------------------------------------------------------
def _quant_bytes(mod, mode: str, group: int | None, dbytes: int) -> int:
    n, k = mod.out_features, mod.in_features
    bias = n * dbytes if mod.bias is not None else 0
    if mode == "int8":
        return n * k + n * dbytes + bias
    return n * k // 2 + 2 * n * (k // group) * dbytes + bias


def _weights(family, cfg, dbytes: int, quant: str, group: int | None) -> dict:
    import torch
    from .api import no_init_weights
    with torch.device("meta"), no_init_weights():
        model = family.build(cfg)
    modes = {}
    if quant != "none":
        from .quant import plan_modules
        modes = plan_modules(model, quant, group or 64)
    sizes = {"vision": 0, "projector": 0, "embedding": 0, "layers": 0, "head": 0}
    params = {"vision": 0, "projector": 0, "language_model": 0}
    quantized_params = set()
    for name, mod in model.named_modules():
        if name in modes:
            part = "head" if name == "lm_head" else "layers"
            sizes[part] += _quant_bytes(mod, modes[name], group, dbytes)
            quantized_params.update(f"{name}.{p}" for p, _ in mod.named_parameters())
    tied = cfg.text.tie_word_embeddings
    for name, p in model.named_parameters():
        owner = model.parts.get(name.split(".", 1)[0], "language_model")
        part = ("embedding" if name.startswith("language_model.embed_tokens.") else
                "head" if name.startswith("lm_head.") else "layers" if owner == "language_model" else owner)
        if part == "head" and tied:
            pass                           # the same tensor as the embedding
        else:
            params["vision" if part == "vision" else "projector" if part == "projector" else "language_model"] \
                += p.numel()
        if name in quantized_params or (part == "head" and tied):
            continue
        sizes[part] += p.numel() * dbytes
    from .quant.linear import BLOCK_ROWS
    planned = [m for n, m in model.named_modules() if n in modes]
    largest = max((m.in_features * m.out_features for m in planned), default=0)
    block = max((min(m.out_features, BLOCK_ROWS) * m.in_features for m in planned), default=0)
    return {"sizes": sizes, "params": params, "n_layers": cfg.text.num_hidden_layers, "largest_quantized": largest,
            "largest_block": block}


def _prefill_activations(cfg, tokens: int, cache_len: int, images: int, per_image: int, dbytes: int) -> int:
    t = cfg.text
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    per_token = (4 * t.hidden_size * dbytes            # embeddings, residual stream, normed input, attn/mlp out
                 + 2 * t.hidden_size * 4               # RMSNorm's float32 copies
                 + (qkv + t.num_attention_heads * t.head_dim) * dbytes * 2   # q, k, v, roped copies, attn out
                 + 3 * t.intermediate_size * dbytes    # gate, up, silu(gate) * up
                 + cache_len)                          # the (T, S) boolean causal mask
    image_embeds = images * per_image * t.hidden_size * dbytes * 2   # engine + image cache
    logits = t.vocab_size * 4 * 2                       # last position only, + the sampler's float copy
    return tokens * per_token + image_embeds + logits


# ---- the plan -----------------------------------------------------------------------------------
def available_memory(device: str) -> int | None:
    """Memory the device can give now: MemAvailable on the CPU, free GPU memory on CUDA."""
    if device == "cuda":
        try:
            import torch
            if torch.cuda.is_available():
                return int(torch.cuda.mem_get_info()[0])
        except Exception:       # noqa: BLE001 - no GPU here means "unknown"
            pass
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan(cfg_or_path, *, device: str = "cpu", memory=None, ctx: int | None = 4096, images: int = 1,
         quant=None, dtype=None) -> Plan:
    """Plan the memory of running a model (a folder, a config.json, a parsed dict or a VLMConfig)."""
    device = str(device or "cpu").split(":")[0]
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda")
    if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1):
        raise ConfigError(f"ctx must be a positive number of tokens, got {ctx!r}")
    if not isinstance(images, int) or isinstance(images, bool) or images < 0:
        raise ConfigError(f"images must be a whole number >= 0, got {images!r}")
    mode, group = _parse_quant(quant)
    dtype_name = _dtype_name(dtype, device)
    dbytes = DTYPE_BYTES[dtype_name]
    budget = parse_size(memory) if memory is not None else available_memory(device)
    family, cfg, notes, raw, image_processor = _load_config(cfg_or_path)
    if memory is None and budget is not None:
        notes.append(f"budget = memory available on the {device} now; pass --memory to plan for another machine")
    t = cfg.text
    if ctx is None:
        ctx = t.max_position_embeddings
    if ctx > t.max_position_embeddings:
        notes.append(f"ctx {ctx} is beyond the model's trained {t.max_position_embeddings} positions")
    if images and cfg.vision is None:
        notes.append("a text-only model: images ignored")
        images = 0
    per_image, vision_activations, vision_notes = family.plan_vision(cfg, images, dbytes, image_processor)
    notes += vision_notes
    if images * per_image >= ctx:
        raise ContextLengthError(images * per_image + 1, ctx, f"{images} image(s) (x {per_image} tokens)")
    load_peak = 0
    saved = raw.get("quantization") if isinstance(raw.get("quantization"), dict) else None
    if saved:
        if mode != "none":
            raise ConfigError(f"quant={quant!r}: this checkpoint is already quantized ({saved.get('mode')}); "
                              f"plan it without --quant")
        mode, group = saved.get("mode", "int8"), saved.get("group_size")
        notes.append(f"a quantized checkpoint ({mode}): sizes as saved")
    w = _weights(family, cfg, dbytes, mode, group)
    s = w["sizes"]
    if mode != "none" and not saved:
        # one float matrix at a time, and float32 temporaries of BLOCK_ROWS of its rows (the block,
        # its scaled copy, the rounded codes: 3 alive at once)
        temporaries = 3 * 4 * w["largest_block"]
        load_peak = (CPU_OVERHEAD_BYTES if device == "cpu" else CUDA_OVERHEAD_BYTES) + sum(s.values()) \
            + dbytes * w["largest_quantized"] + temporaries
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * ctx * dbytes
    p = Plan(device=device, dtype=dtype_name, quant=mode if mode == "none" or mode == "int8" else f"int4-g{group}",
             ctx=ctx, images=images, memory=budget, image_tokens_per_image=per_image, parameters=w["params"],
             vision=s["vision"], projector=s["projector"], embedding=s["embedding"], layers=s["layers"],
             head=s["head"], kv_cache=kv, vision_activations=vision_activations,
             prefill_activations=_prefill_activations(cfg, ctx, ctx, images, per_image, dbytes),
             overhead=CUDA_OVERHEAD_BYTES if device == "cuda" else CPU_OVERHEAD_BYTES,
             n_layers=w["n_layers"], layer_bytes=s["layers"] // max(w["n_layers"], 1), load_peak=load_peak,
             notes=notes)
    if device == "cuda" and p.fits is False:
        p.gpu_layers = suggest_gpu_layers(p)
    return p


def suggest_gpu_layers(p: Plan) -> int:
    """How many decoder layers (with their KV cache) fit on the GPU beside everything else."""
    fixed = p.vision + p.projector + p.head + p.activations + p.overhead
    if p.head == 0:                 # tied: the GPU needs its own copy of the head
        fixed += p.embedding
    per_layer = p.layer_bytes + p.kv_cache // max(p.n_layers, 1)
    room = p.memory - fixed
    if room <= 0 or per_layer <= 0:
        return 0
    return min(p.n_layers, room // per_layer)


# ---- refusing a request before it runs ----------------------------------------------------------
def check_fits(vlm, prompt_tokens: int, max_tokens: int, images: int = 0, *, available: int | None = None) -> None:
    """Raise ContextLengthError or MemoryBudgetError when a request cannot run on this loaded model.

    Counts only what the request adds to the loaded model: a larger KV cache than the one the
    engine holds, and the activations of encoding its images and prefilling its prompt.
    `available` defaults to what the device can give now."""
    from .engine.generate import CACHE_BLOCK
    ctx = vlm.context_length
    if prompt_tokens >= ctx:
        raise ContextLengthError(prompt_tokens + 1, ctx)
    cfg, t = vlm.config, vlm.config.text
    dbytes = DTYPE_BYTES[str(vlm.dtype).replace("torch.", "")]
    needed_tokens = prompt_tokens + max(0, min(max_tokens, ctx - prompt_tokens))
    cache_len = min(-(-needed_tokens // CACHE_BLOCK) * CACHE_BLOCK, max(ctx, needed_tokens))
    held = vlm.model.cache_len
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dbytes
    new_kv = kv_per_token * cache_len if cache_len > held else 0
    per_image, vision_activations, _ = vlm.family.plan_vision(cfg, images, dbytes, None, vlm.processor)
    activations = max(vision_activations,
                      _prefill_activations(cfg, prompt_tokens, max(cache_len, held), images, per_image, dbytes))
    needed = new_kv + activations
    if available is None:
        available = available_memory(torch_device_type(vlm.device))
        if available is None:
            return
        if new_kv:      # the old cache is released as the new one is allocated
            available += kv_per_token * held
    if needed > available:
        raise MemoryBudgetError(needed, available,
                                f"a request of {prompt_tokens} prompt tokens + {max_tokens} to generate "
                                f"with {images} image(s)")


def torch_device_type(device) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


# ---- measuring the overhead ---------------------------------------------------------------------
def peak_rss() -> int:
    """This process's own peak RSS in bytes: VmHWM. getrusage's ru_maxrss is not that on Linux: it is
    carried over exec, so a process started from a large one reports the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_overhead(dtype: str = "bfloat16") -> int:
    """Peak RSS (bytes) of a fresh process that loads the tiny random model and answers one image."""
    import subprocess
    import sys
    import tempfile
    from .bundled import build_random_model
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_random_model(Path(tmp) / "tiny")
        code = ("import json\nfrom PIL import Image\nimport foveal\nfrom foveal.plan import peak_rss\n"
                f"vlm = foveal.load({str(folder)!r}, dtype={dtype!r})\n"
                "vlm.generate([{'role': 'user', 'content': [{'type': 'image', 'image': Image.new('RGB', (64, 64))},"
                " {'type': 'text', 'text': 'hi'}]}], max_tokens=8)\n"
                "print(json.dumps(peak_rss()))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(json.loads(out.stdout.strip().splitlines()[-1]))
