"""foveal against its peers, side by side in one run, on the same random-weight model.

    python benchmarks/bench.py --workload llava-0.5b --repeats 5 --out benchmarks/results.md
    python benchmarks/bench.py --workload qwen2.5-vl-3b --repeats 3 --out benchmarks/results-qwen2.5-vl-3b.md
    foveal bench --workload tiny --repeats 1 --peers transformers        # smoke test
    foveal bench --workload qwen2.5-vl-tiny --repeats 1 --peers transformers

qwen2.5-vl-3b (3.75 B weights, 0.67 B of them the vision tower) writes a 7.5 GB bf16 folder under
--cache-dir, and with llama.cpp F16 / Q8_0 / Q4_0 GGUF pairs of about 7.5, 4.6 and 3.1 GB (each with a
1.3 GB F16 mmproj): about 23 GB of disk in all. Its request is one 1280x960 image (1230 image tokens)
+ question, 1302 prompt tokens; transformers fp32 needs about 17 GB of RAM, the bf16 engines 8-9 GB.

Design decisions:
- One run measures everything, including the machine's memory bandwidth (copy and sum of a
  1 GiB tensor), so ratios compare figures taken under the same conditions; absolute figures
  from a shared machine mean little.
- Each engine runs in its own process (benchmarks/engines.py) so its peak RSS is its own; the
  figures are medians over --repeats runs after --warmup runs.
- Peers are optional: a peer that is not installed, or that fails, is reported as skipped with
  the reason, and the rest of the table still comes out.
- Decode bandwidth = bytes of weights read per decoded token (the LM's layers and its head, from
  foveal's memory planner or the GGUF file's tensor sizes) x tokens/s, as gpt-fast prints it;
  its fraction of the measured machine bandwidth says how close decode runs to the roofline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import WORKLOADS, build, export_gguf, image_size, is_qwen_vl, make_image, prompt_ids  # noqa: E402

FOVEAL_MODES = ("bf16", "bf16-compiled", "int8", "int8-compiled", "int4", "int4-compiled")
FOVEAL = [(f"foveal {m.replace('-', ' ')}", "foveal", m) for m in FOVEAL_MODES]
PEERS = {
    "transformers": [("transformers bf16", "transformers", "bf16"), ("transformers fp32", "transformers", "fp32")],
    "llama.cpp": [("llama.cpp F16", "llama.cpp", "f16"), ("llama.cpp Q8_0", "llama.cpp", "q8_0"),
                  ("llama.cpp Q4_0", "llama.cpp", "q4_0")],
}
METRICS = [   # key, column title, format
    ("image_tokens", "image tokens", "{:d}"),
    ("preprocess_ms", "preprocess ms", "{:.1f}"), ("encode_ms", "encode ms/image", "{:.0f}"),
    ("prefill_tps", "prefill tok/s", "{:.0f}"), ("ttft_ms", "TTFT ms", "{:.0f}"),
    ("decode_tps", "decode tok/s", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("decode_gbps", "decode GB/s", "{:.1f}"), ("bw_fraction", "% of bandwidth", "{:.0%}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="foveal bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="llava-0.5b", choices=WORKLOADS)
    p.add_argument("--repeats", type=int, default=3, help="measured runs per engine; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per engine first (default 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--foveal", default=",".join(FOVEAL_MODES),
                   help="foveal modes to run (bf16,int8,int4, each also as MODE-compiled: load(compile=True), "
                        "which compiles while loading)")
    p.add_argument("--peers", default="transformers,llama.cpp", help="peers to run (transformers,llama.cpp or none)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the bandwidth probe tensor")
    p.add_argument("--cache-dir", default=str(HERE / ".models"), help="where the workload models are written")
    p.add_argument("--out", default=str(HERE / "results.md"), help="markdown file for the table")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.decode_tokens < 2:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0, --decode-tokens >= 2")
    modes = [m for m in args.foveal.split(",") if m]
    if any(m not in FOVEAL_MODES for m in modes):
        p.error(f"--foveal {args.foveal!r}: use a comma list of {', '.join(FOVEAL_MODES)}")
    peers = [] if args.peers in ("", "none") else args.peers.split(",")
    if any(x not in PEERS for x in peers):
        p.error(f"--peers {args.peers!r}: use a comma list of {', '.join(PEERS)} (or none)")
    args.foveal_modes, args.peer_list = modes, peers
    return args


# ---- the machine ------------------------------------------------------------------------------------
def machine(device: str, threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    text = (f"{cpu}, {os.cpu_count()} logical cores ({threads} threads used), ISA: {' '.join(isa) or 'n/a'}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name()}"
    return text


def bandwidth(mib: int, device: str, threads: int) -> dict:
    """Memory bandwidth in GB/s: sum (read) and copy (read + write) of a float32 tensor, median of 5."""
    torch.set_num_threads(threads)
    n = mib * 2**20 // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    reads, copies = [], []
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum().item()
        t1 = time.perf_counter()
        y.copy_(x)
        sync()
        t2 = time.perf_counter()
        reads.append(x.numel() * 4 / (t1 - t0) / 1e9)
        copies.append(2 * x.numel() * 4 / (t2 - t1) / 1e9)
    return {"read": statistics.median(reads[1:]), "copy": statistics.median(copies[1:])}


# ---- bytes read per decoded token ---------------------------------------------------------------------
def decode_bytes(folder: Path, engine: str, variant: str, gguf: Path | None = None) -> int:
    """Weights one decode step reads: the LM's layers and its head (a tied head reads the embedding)."""
    if engine == "llama.cpp":
        from gguf import GGUFReader
        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
        head = tensors.get("output.weight", tensors.get("token_embd.weight", 0))
        return sum(v for k, v in tensors.items() if k not in ("token_embd.weight", "output.weight")) + head
    from foveal.plan import plan
    mode = variant.removesuffix("-compiled")
    quant = mode if mode in ("int8", "int4") else None
    p = plan(folder, ctx=4096, images=1, quant=quant, dtype="float32" if variant == "fp32" else "bfloat16",
             memory="1TiB")
    return p.layers + (p.head or p.embedding)


def _has_qwen_handler() -> bool:
    """Whether llama-cpp-python has mtmd's Qwen2.5-VL chat handler (asked in a child process: importing
    llama_cpp here would add its library to this process)."""
    probe = "import llama_cpp.llama_chat_format as f; raise SystemExit(0 if hasattr(f, 'Qwen25VLChatHandler') else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# ---- running one engine ----------------------------------------------------------------------------------
def run_engine(job: dict, timeout: float = 3600) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    proc = subprocess.run([sys.executable, str(HERE / "engines.py"), json.dumps(job)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"exit {proc.returncode}: {tail}")


def summarize(result: dict, bytes_per_token: int, bw: dict) -> dict:
    row = {}
    for key, _, _ in METRICS:
        values = [r[key] for r in result["runs"] if r.get(key) is not None]
        if values:
            row[key] = values[0] if key == "image_tokens" else statistics.median(values)
    row["peak_rss_mib"] = result["peak_rss"] / 2**20
    if "peak_gpu" in result:
        row["peak_gpu_mib"] = result["peak_gpu"] / 2**20
    if row.get("decode_tps"):
        row["decode_gbps"] = bytes_per_token * row["decode_tps"] / 1e9
        row["bw_fraction"] = row["decode_gbps"] / bw["read"]
    row["prompt_tokens"] = result["runs"][0]["prompt_tokens"] if result["runs"] else None
    row["generated"] = result["runs"][0]["generated"] if result["runs"] else None
    return row


# ---- the table ----------------------------------------------------------------------------------------------
def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: dict, header: list[str], skipped: list[str], notes: list[str]) -> str:
    lines = header + [""]
    cols = [title for _, title, _ in METRICS]
    lines += ["| engine | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(fmt, row.get(key)) for key, _, fmt in METRICS) + " |")
    ours = [n for n in rows if n.startswith("foveal")]
    theirs = [n for n in rows if not n.startswith("foveal")]
    if ours and theirs:
        lines += ["", "Ratios (foveal / peer: > 1 = foveal faster; for peak RSS < 1 = foveal smaller)", "",
                  "| foveal vs peer | encode | prefill | TTFT | decode | peak RSS |", "|---|---|---|---|---|---|"]
        for a in ours:
            for b in theirs:
                x, y = rows[a], rows[b]
                cells = [_ratio(y.get("encode_ms"), x.get("encode_ms")),
                         _ratio(x.get("prefill_tps"), y.get("prefill_tps")),
                         _ratio(y.get("ttft_ms"), x.get("ttft_ms")), _ratio(x.get("decode_tps"), y.get("decode_tps")),
                         _ratio(x.get("peak_rss_mib"), y.get("peak_rss_mib"))]
                lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s}" for s in skipped]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def _ratio(num, den) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


# ---- the run -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 1
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building {args.workload} in {cache} ...", file=sys.stderr)
    folder = build(args.workload, cache)
    width, height = image_size(args.workload)
    image = make_image(cache / ("bench-image.png" if (width, height) == (640, 480) else
                                f"bench-image-{width}x{height}.png"), (width, height))
    ids, n_image = prompt_ids(folder, image)
    print(f"model ready ({time.perf_counter() - t0:.0f} s); measuring bandwidth ...", file=sys.stderr)
    bw = bandwidth(args.bandwidth_mib, device, args.threads)
    common = dict(folder=str(folder), image=str(image), device=device, threads=args.threads, repeats=args.repeats,
                  warmup=args.warmup, decode_tokens=args.decode_tokens)

    jobs, skipped, notes = [], [], []
    for label, engine, variant in FOVEAL:
        if variant in args.foveal_modes:
            jobs.append((label, dict(common, engine=engine, variant=variant)))
    for peer in PEERS:
        if peer not in args.peer_list:
            skipped.append(f"{peer}: not asked for (--peers)")
            continue
        module = "transformers" if peer == "transformers" else "llama_cpp"
        if importlib.util.find_spec(module) is None:
            hint = ("pip install transformers" if peer == "transformers" else
                    "pip install llama-cpp-python; it builds llama.cpp from source, and on VMs where its native "
                    "AMX int8 path crashes needs CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF ...'")
            skipped.append(f"{peer}: the `{module}` package is not installed ({hint})")
            continue
        for label, engine, variant in PEERS[peer]:
            if engine == "transformers" and variant == "fp32" and device.startswith("cuda"):
                skipped.append(f"{label}: not run on CUDA (fp32 is the CPU reference)")
                continue
            job = dict(common, engine=engine, variant=variant)
            if engine == "llama.cpp":
                if is_qwen_vl(folder) and not _has_qwen_handler():
                    skipped.append(f"{label}: this llama-cpp-python has no Qwen25VLChatHandler (mtmd's Qwen2.5-VL "
                                   f"chat handler); a newer release has it")
                    continue
                job["image_token_id"] = json.loads((folder / "config.json").read_text())["image_token_id"]
                try:
                    gguf, mmproj = export_gguf(folder, variant)
                except Exception as e:     # noqa: BLE001 - a failed export skips this peer, says why
                    skipped.append(f"{label}: GGUF export failed ({type(e).__name__}: {e})")
                    continue
                job |= {"gguf": str(gguf), "mmproj": str(mmproj)}
            jobs.append((label, job))

    rows = {}
    for label, job in jobs:
        print(f"running {label} ...", file=sys.stderr)
        try:
            result = run_engine(job)
        except Exception as e:             # noqa: BLE001 - one failing engine must not lose the others
            skipped.append(f"{label}: failed ({e})")
            continue
        nbytes = decode_bytes(folder, job["engine"], job["variant"], Path(job["gguf"]) if "gguf" in job else None)
        rows[label] = summarize(result, nbytes, bw)
        notes += result.get("notes", [])
        print(f"  {label}: " + ", ".join(f"{k} {_fmt(f, rows[label].get(k))}" for k, _, f in METRICS), file=sys.stderr)

    words = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in words)
    header = [f"## foveal benchmark: {args.workload} on {device}", "",
              f"- command: `{command}`",
              f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
              f"- machine: {machine(device, args.threads)}",
              f"- memory bandwidth (this run, {args.bandwidth_mib} MiB float32): read (sum) {bw['read']:.1f} GB/s, "
              f"copy {bw['copy']:.1f} GB/s",
              f"- request: 1 image ({n_image} image tokens) + question = {len(ids)} prompt tokens, "
              f"{args.decode_tokens} decoded tokens (EOS ignored), greedy",
              f"- medians of {args.repeats} run(s) after {args.warmup} warm-up run(s) per engine, each engine in its "
              f"own process; peak RSS is that process's VmHWM"]
    text = markdown(rows, header, skipped, notes)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "bandwidth": bw, "skipped": skipped,
                                                      "notes": notes, "workload": args.workload,
                                                      "device": device}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
