"""`foveal` command line: run, chat, info (serve, train, eval, ... join as their issues land).

Design decisions:
- One front end for every model family; a model is a positional reference, optional where a
  bundled default exists.
- Errors foveal raises on purpose (FovealError) print one line `error: ...` and exit 1; an
  unexpected exception is a bug and keeps its traceback.
- Answers stream to stdout as they decode; statistics go to stderr with --stats so stdout stays
  clean for pipes.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import FovealError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                   help="with --device cuda: only the last N decoder layers on the GPU, the rest on the CPU, "
                        "for a GPU too small for the model (`foveal plan` suggests N; default: all)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: bfloat16 where the "
                                                   "hardware supports it)")
    p.add_argument("--compile", action="store_true", help="decode steps through torch.compile (~10%% faster "
                                                          "decode; loading waits for the compilation)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--vision-tower", default=None, help="original-LLaVA checkpoints: the CLIP tower folder")
    p.add_argument("--mmproj", default=None, help="GGUF models: the projector (mmproj) file")
    p.add_argument("--image-mode", choices=("crop", "pad", "resize"), default=None,
                   help="image preprocessing (default: the checkpoint's processor config)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--image-min-tokens", type=int, default=None, metavar="N",
                   help="dynamic-resolution models (Qwen2-VL): resize each image to take at least N tokens")
    p.add_argument("--image-max-tokens", type=int, default=None, metavar="N",
                   help="dynamic-resolution models (Qwen2-VL): resize each image to take at most N tokens")


def _sampling(args) -> dict:
    from .engine.sampling import SamplingOptions
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop,
                   min_image_tokens=args.image_min_tokens, max_image_tokens=args.image_max_tokens)
    SamplingOptions.from_kwargs(**options)      # refuse a bad value before a model takes seconds to load
    return options


def _add_quant_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", default=None, metavar="int8|int4|int4-gN",
                   help="quantize the language model's weights while loading (default: as stored)")


def _load(args, model):
    from .api import load
    return load(model, device=args.device, dtype=args.dtype, context_length=args.ctx,
                vision_tower=args.vision_tower, image_mode=args.image_mode, mmproj=args.mmproj,
                quant=getattr(args, "quant", None), gpu_layers=args.gpu_layers, compile=args.compile)


def _print_stats(stats, out=None) -> None:
    out = out or sys.stderr     # looked up now: a default bound at import keeps a stream that may be replaced
    video = f"{stats.video_tokens} video ({stats.video_frames} frames), " if stats.videos else ""
    print(f"[{stats.prompt_tokens} prompt tokens ({stats.image_tokens} image, {video}{stats.cached_tokens} cached), "
          f"{stats.generated_tokens} generated | preprocess {stats.preprocess_s * 1e3:.0f} ms, encode "
          f"{stats.encode_s * 1e3:.0f} ms, prefill {stats.prefill_s * 1e3:.0f} ms "
          f"({stats.prefill_tokens_per_s:.0f} tok/s), decode {stats.decode_s * 1e3:.0f} ms "
          f"({stats.decode_tokens_per_s:.1f} tok/s)]", file=out)


def _format(value):
    if value is None or value == "json":
        return value
    try:
        with open(value) as f:
            return json.load(f)
    except OSError as e:
        raise FovealError(f"--format {value}: cannot read the schema file: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise FovealError(f"--format {value}: the schema file is not valid JSON: {e}") from None


class ThoughtPrinter:
    """A thinking model's thought (engine/thinking.py): kept for the chat history and, with --think, shown
    on stderr as it streams, before the answer on stdout."""

    def __init__(self, visible: bool):
        self.visible, self.parts, self.open = visible, [], False

    def show(self, chunk) -> None:
        if chunk.thinking:
            self.parts.append(chunk.thinking)
            if self.visible:
                if not self.open:
                    print("Thinking...", file=sys.stderr)
                    self.open = True
                print(chunk.thinking, end="", file=sys.stderr, flush=True)
        if self.open and (chunk.text or chunk.done):
            print("\n...done thinking.\n", file=sys.stderr, flush=True)
            self.open = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


def cmd_run(args) -> int:
    if len(args.words) == 1:
        model, prompt = None, args.words[0]
    elif len(args.words) == 2:
        model, prompt = args.words
    else:
        raise FovealError("usage: foveal run [MODEL] [--image FILE ...] [--video FILE ...] PROMPT")
    sampling, schema = _sampling(args), _format(args.format)
    vlm = _load(args, args.model or model)
    if args.video_fps is not None and args.video_fps <= 0:
        raise FovealError(f"--video-fps must be a positive number, got {args.video_fps:g}")
    content = [{"type": "image", "image": path} for path in args.image or []]
    content += [{"type": "video", "video": path, **({"fps": args.video_fps} if args.video_fps else {})}
                for path in args.video or []]
    content.append({"type": "text", "text": prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": content}]
    last, thinking = None, ThoughtPrinter(args.think)
    for chunk in vlm.stream(messages, format=schema, **sampling):
        thinking.show(chunk)
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    if args.stats:
        _print_stats(last.stats)
    return 0


def cmd_chat(args) -> int:
    from .engine.thinking import with_thought
    sampling = _sampling(args)
    vlm = _load(args, args.model)
    history, pending_images = [], []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"foveal chat with {vlm.name}: /image PATH attaches an image, /clear forgets, /exit leaves")
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            break
        if line == "/clear":
            history, pending_images = [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                from .processing.images import load_image
                load_image(path, vlm.image_limits)       # refuse a bad image now, not at the next question
            except FovealError as e:
                print(f"error: {e}")
                continue
            pending_images.append(path)
            print(f"(image {path} attached to your next message)")
            continue
        if line.startswith("/"):
            print("commands: /image PATH, /clear, /exit")
            continue
        content = [{"type": "image", "image": p} for p in pending_images] + [{"type": "text", "text": line}]
        turn = history + [{"role": "user", "content": content}]
        reply, last, thinking = [], None, ThoughtPrinter(args.think)
        try:
            for chunk in vlm.stream(turn, **sampling):
                thinking.show(chunk)
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
                last = chunk
        except FovealError as e:
            print(f"error: {e}")
            continue
        print()
        if args.stats:
            _print_stats(last.stats)
        said = with_thought("".join(reply).strip(), thinking.text)   # the next turn reads it as it was written
        history = turn + [{"role": "assistant", "content": [{"type": "text", "text": said}]}]
        pending_images = []
    return 0


INFO_IMAGE_SIZES = ((336, 336), (480, 640), (960, 1280), (1080, 1920))   # (height, width)


def info_dict(vlm) -> dict:
    counts = vlm.parameter_counts()
    described = vlm.describe()
    d = {
        "model": str(vlm.path),
        "family": described["family"],
        "architecture": described["architecture"],
        "layout": described["layout"],
        "language_model": described["language_model"],
        "vision_tower": described["vision_tower"],
        "projector": described["projector"],
        "parameters": counts | {"total": sum(counts.values())},
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "image_size": described["image_size"],
        "image_tokens_per_image": described["image_tokens_per_image"],
        "max_image_tokens": described["max_image_tokens"],
        "image_grid_pinpoints": described["image_grid_pinpoints"],
        "image_tokens_by_size": ({f"{w}x{h}": vlm.image_tokens((h, w)) for h, w in INFO_IMAGE_SIZES}
                                 if described["vision_tower"] else None),
        "context_length": vlm.context_length,
        "weight_bytes": vlm.weight_bytes(),
        "weight_bytes_by_device": {t: n for t in ("cpu", "cuda") if (n := vlm.weight_bytes(t))},
    }
    return d


def _image_tokens_line(d: dict) -> str:
    if not d["vision_tower"]:
        return "0"
    if d["image_grid_pinpoints"]:
        return (f"{d['image_tokens_per_image']}-{d['max_image_tokens']} (anyres: {d['image_size']}-px tiles at "
                f"{', '.join(f'{h}x{w}' for h, w in d['image_grid_pinpoints'])})")
    if d["image_size"]:
        return f"{d['image_tokens_per_image']} ({d['image_size']} px)"
    sizes = ", ".join(f"{size}: {n}" for size, n in d["image_tokens_by_size"].items())
    return f"up to {d['max_image_tokens']}, by the image's size ({sizes})"


def cmd_info(args) -> int:
    vlm = _load(args, args.model)
    d = info_dict(vlm)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    p = d["parameters"]
    lines = [
        ("model", d["model"]),
        ("architecture", f"{d['architecture']} ({d['layout']} layout)"),
        ("language model", d["language_model"]),
        ("vision tower", d["vision_tower"] or "none (text only)"),
        ("projector", d["projector"] or "-"),
        ("parameters", f"{_human(p['total'])} total: vision {_human(p['vision'])}, projector "
                       f"{_human(p['projector'])}, language model {_human(p['language_model'])}"),
        ("dtype", d["dtype"]),
        ("image tokens/image", _image_tokens_line(d)),
        ("context length", d["context_length"]),
        ("weight memory", f"{d['weight_bytes'] / 2**20:.1f} MiB" + (
            " (" + ", ".join(f"{t} {n / 2**20:.1f} MiB" for t, n in d["weight_bytes_by_device"].items()) + ")"
            if len(d["weight_bytes_by_device"]) > 1 else "")),
    ]
    for k, v in lines:
        print(f"{k:<20}{v}")
    return 0


def cmd_ls(args) -> int:
    from .weights.resolve import list_models
    models = list_models()
    if args.json:
        print(json.dumps([{"name": m.name, "source": m.source, "kind": m.kind, "path": str(m.path),
                           "mmproj": str(m.mmproj) if m.mmproj else None, "size_bytes": m.size_bytes,
                           "vision": m.is_vlm} for m in models], indent=2))
        return 0
    if not models:
        print("no models found in the Hugging Face cache, the Ollama store or LM Studio's folders")
        return 0
    width = max(len(m.name) for m in models) + 2
    print(f"{'NAME':<{width}}{'SOURCE':<10}{'FORMAT':<8}{'SIZE':>10}  VISION")
    for m in models:
        print(f"{m.name:<{width}}{m.source:<10}{m.kind:<8}{m.size_bytes / 2**30:>8.2f}GB  "
              f"{'yes' if m.is_vlm else 'no'}")
    return 0


def cmd_pull(args) -> int:
    from .weights.pull import parse_ref, pull
    from .weights.resolve import resolve
    folder = pull(args.ref, revision=args.revision, include=args.include)
    repo_id, file, revision = parse_ref(args.ref, args.revision)
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"pulled {repo_id}{'@' + revision if revision else ''} (commit {folder.name[:12]}): {len(files)} files, "
          f"{size / 2**20:.1f} MiB in {folder}")
    ref = "hf:" + repo_id + (f"/{file}" if file else "") + (f"@{revision}" if revision else "")
    try:
        found = resolve(ref)
    except FovealError as e:    # e.g. --include left the weights out
        print(f"note: {ref} does not load from these files yet: {e}", file=sys.stderr)
        return 0
    print(f"load it with: foveal run {ref} ...  ({found.kind}, {'vision' if found.is_vlm else 'text only'})")
    return 0


def cmd_export(args) -> int:
    from .weights.gguf import read_hf_folder, write_gguf
    from .weights.resolve import resolve
    found = resolve(args.model)
    if found.kind != "hf":
        raise FovealError(f"{args.model} is already a GGUF model; export takes a Hugging Face-format folder")
    model, mmproj = write_gguf(read_hf_folder(found.path), args.gguf, type=args.type, head_type=args.head_type)
    print(f"wrote {model}" + (f" and {mmproj}" if mmproj else ""))
    return 0


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_serve(args) -> int:
    import logging
    import os
    from pathlib import Path
    from .server import ServerConfig, serve
    from .server.config import parse_duration
    from .processing.images import ImageLimits, VideoLimits
    try:
        keep_alive = parse_duration(args.keep_alive, "--keep-alive")
    except ValueError as e:
        raise FovealError(str(e)) from None
    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("FOVEAL_API_KEY"),
                          insecure=args.insecure, allowed_hosts=args.allowed_host or [],
                          cors_origins=args.cors_origin or [], max_body_bytes=args.max_body_mb * 2**20,
                          max_header_bytes=args.max_header_kb * 2**10,
                          max_queue=args.max_queue, max_images=args.max_images,
                          max_video_bytes=args.max_video_mb * 2**20,
                          image_url_domains=args.allow_image_host or [],
                          image_root=Path(args.image_root).expanduser() if args.image_root else None,
                          keep_alive_s=keep_alive)
    config.check_bind()      # before loading anything: a refused bind should fail fast
    logging.basicConfig(level=logging.INFO if args.access_log else logging.WARNING, format="%(message)s")
    serve(args.models, config, dict(device=args.device, dtype=args.dtype, context_length=args.ctx,
                                    vision_tower=args.vision_tower, image_mode=args.image_mode,
                                    mmproj=args.mmproj, quant=args.quant, gpu_layers=args.gpu_layers,
                                    compile=args.compile,
                                    image_limits=ImageLimits(video=VideoLimits(max_bytes=config.max_video_bytes))))
    return 0


def cmd_quantize(args) -> int:
    from .api import load
    from .quant import quantize_model, save_quantized
    from .quant.check import compare, load_samples
    samples = load_samples(args.check) if args.check else None
    opts = dict(device=args.device, dtype=args.dtype, context_length=args.ctx, vision_tower=args.vision_tower,
                mmproj=args.mmproj, gpu_layers=args.gpu_layers, compile=args.compile)
    vlm = load(args.model, **opts)
    plan = quantize_model(vlm.model, args.mode, args.group_size, vision=args.vision, symmetric=args.symmetric)
    out = save_quantized(vlm.model, vlm.config, vlm.path, args.out, vlm.raw_config, vlm.family)
    modes = sorted(set(plan.values()))
    print(f"wrote {out}: {len(plan)} linear layers quantized ({', '.join(modes)}), weights "
          f"{vlm.weight_bytes() / 2**20:.1f} MiB")
    if samples:
        quantized = load(out, **{k: v for k, v in opts.items() if k not in ("vision_tower", "mmproj")})
        del vlm
        original = load(args.model, **opts)
        report = compare(original, quantized, samples, max_tokens=args.check_tokens)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_eval(args) -> int:
    from .eval.cli import run
    return run(args, lambda model: _load(args, model))


def cmd_plan(args) -> int:
    from .plan import plan
    p = plan(args.model, device=args.device, memory=args.memory, ctx=args.ctx, images=args.images,
             quant=args.quant, dtype=args.dtype)
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.report())
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not bench.exists():
        raise FovealError(f"the benchmark script is not installed ({bench}); run it from a source checkout")
    import runpy
    words = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    return runpy.run_path(str(bench), run_name="foveal_bench")["main"](words)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foveal", description="Run vision-language models on your machine.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="answer one prompt (optionally about images)")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT")
    p.add_argument("--model", default=None, help="model reference (instead of the first positional)")
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument("--video", action="append", help="video file (repeatable; Qwen2-VL models; needs PyAV)")
    p.add_argument("--video-fps", type=float, default=None, metavar="FPS",
                   help="frames a second sampled from each video (default: the model's, 2 for Qwen2-VL)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print token counts and stage timings to stderr")
    p.add_argument("--think", action="store_true", help="show a thinking model's thought on stderr")
    p.add_argument("--format", default=None, metavar="json|SCHEMA.json",
                   help="constrain the answer to JSON: 'json' for any object, or a JSON-schema file")
    _add_model_options(p)
    _add_quant_option(p)
    _add_sampling_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat (/image PATH, /clear, /exit)")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--stats", action="store_true")
    p.add_argument("--think", action="store_true", help="show a thinking model's thought on stderr")
    _add_model_options(p)
    _add_quant_option(p)
    _add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameter counts, image tokens, context, memory")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    _add_model_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write a model as GGUF (text model + mmproj) for llama.cpp / Ollama")
    p.add_argument("model")
    p.add_argument("--gguf", required=True, metavar="OUT_DIR", help="folder to write the .gguf files into")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0", "q4_0"))
    p.add_argument("--head-type", default=None, choices=("f32", "f16", "q8_0", "q4_0"),
                   help="type of the output head / tied embedding (default: f16 for q8_0, q8_0 for q4_0, "
                        "else --type), like llama-quantize's --output-tensor-type")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the HF cache (resumable)")
    p.add_argument("ref", metavar="REF", help="hf:ORG/NAME or ORG/NAME (optionally /FILE.gguf, @REVISION)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default main)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="fetch only files matching GLOB (repeatable; default: what loading reads: *.json, "
                        "*.safetensors, *.jinja, *.txt, *.model)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("ls", help="models found in the HF cache, the Ollama store and LM Studio's folders")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    from .server.config import DEFAULT_HOST, DEFAULT_PORT
    p = sub.add_parser("serve", help=f"HTTP server speaking the Ollama and OpenAI APIs (port {DEFAULT_PORT})")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folders (default: the bundled model)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, next to "
                                                                  f"Ollama's 11434)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or FOVEAL_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key")
    p.add_argument("--allowed-host", action="append", help="extra Host header value to accept ('*': any)")
    p.add_argument("--cors-origin", action="append", help="allow browser requests from this origin")
    p.add_argument("--allow-image-host", action="append", help="host from which image URLs may be fetched")
    p.add_argument("--image-root", default=None, help="folder under which file:// image URLs may be read")
    p.add_argument("--max-body-mb", type=int, default=64, help="request body limit in MiB (default 64)")
    p.add_argument("--max-header-kb", type=int, default=16,
                   help="request line + headers limit in KiB; over it: 431 (default 16)")
    p.add_argument("--max-queue", type=int, default=16, help="queued requests per model before 503 (default 16)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max-video-mb", type=int, default=256,
                   help="one video_url's size in MiB (a file:// or fetched video; default 256)")
    p.add_argument("--keep-alive", default="-1", help="idle time before a model unloads, e.g. 5m (default -1: "
                                                     "never, since the models were named at start-up)")
    p.add_argument("--access-log", action="store_true", help="log one JSON line per request")
    _add_model_options(p)
    _add_quant_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="write an int8 / int4 weight-only quantized checkpoint")
    p.add_argument("model")
    p.add_argument("out", help="output folder")
    p.add_argument("--mode", choices=("int8", "int4"), default="int8")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64, 128 or 256 (default 64)")
    p.add_argument("--symmetric", action="store_true", help="int4: symmetric groups (no zero points)")
    p.add_argument("--vision", choices=("int8", "int4"), default=None,
                   help="also quantize the vision tower and projector (default: keep them in float)")
    p.add_argument("--check", default=None, metavar="IMAGES_OR_EVAL_FILE",
                   help="compare with the original: images (file, folder, a,b,c) or a JSON/JSONL eval file")
    p.add_argument("--check-tokens", type=int, default=24, help="answer length for --check (default 24)")
    p.add_argument("--json", action="store_true", help="print the --check report as JSON")
    _add_model_options(p)
    p.set_defaults(func=cmd_quantize)

    from .eval.cli import add_arguments as add_eval_arguments
    p = sub.add_parser("eval", help="score a model or an OpenAI/Ollama endpoint on VQAv2, TextVQA, POPE, "
                                    "MMBench or LLaVA files")
    add_eval_arguments(p)
    _add_model_options(p)
    _add_quant_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plan", help="will it run? memory of each part, the verdict, a --gpu-layers suggestion")
    p.add_argument("model", help="model folder or config.json (no weights needed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--memory", default=None, help="budget, e.g. 8GiB or 16GB (default: what the device has free)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--images", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--quant", default="none", help="none, int8, int4 or int4-gN (default none)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: as load() picks)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="speed and memory against transformers and llama.cpp (benchmarks/bench.py)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of benchmarks/bench.py (--help)")
    p.set_defaults(func=cmd_bench)

    from .train.cli import add_train_parser
    add_train_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:     # every word after it belongs to benchmarks/bench.py (argparse mangles REMAINDER)
        argv = ["bench", "--", *argv[1:]]
    # `foveal run MODEL --image a.png "question"` puts options between positionals, which
    # argparse leaves over: take the left-over words as more positionals of `run`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "run" or any(w.startswith("-") and len(w) > 1 for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.words += extra
    if args.version:
        from . import __version__
        print(f"foveal {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except FovealError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
