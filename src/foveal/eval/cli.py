"""`foveal eval`: the command's options and its body (foveal/cli.py only registers it).

    foveal eval [MODEL] --data FILE [--annotations FILE] [--images DIR] [--format F] [--limit N]
                [--circular] [--endpoint URL --api openai|ollama] [--out RUN.json] [--restart]
    foveal eval --compare A.json B.json
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import EvalConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or reference (default: the bundled model); with --endpoint, the "
                        "model's name on the server (default: the first it lists)")
    p.add_argument("--data", help="benchmark file: VQAv2 questions JSON, TextVQA JSON, POPE JSONL, MMBench "
                                  "TSV or LLaVA conversation JSON")
    p.add_argument("--annotations", help="VQAv2 annotations JSON (default: found next to the questions)")
    p.add_argument("--images", help="image folder (default: next to the data file, or its images/)")
    p.add_argument("--format", default="auto", help="auto (default), vqav2, textvqa, pope, mmbench or llava")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    p.add_argument("--circular", action="store_true",
                   help="multiple choice: ask every rotation of the options; a question is right only if "
                        "all rotations are")
    p.add_argument("--prompt-suffix", default=None,
                   help="instruction appended to each question (default: LLaVA's short-answer / option-letter "
                        "instruction; '' sends the bare question)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer length limit, a thought included (default 64)")
    p.add_argument("--endpoint", default=None, help="evaluate a server instead of a local model: base URL")
    p.add_argument("--api", default=None, help="the endpoint's API: openai (default) or ollama")
    p.add_argument("--api-key", default=None, help="bearer token for the endpoint (default: $FOVEAL_API_KEY, "
                                                   "then $OPENAI_API_KEY for openai)")
    p.add_argument("--out", default=None, help="report path RUN.json; RUN.predictions.jsonl and RUN.png go next "
                                               "to it (default: foveal-eval/<data>-<model>.json)")
    p.add_argument("--restart", action="store_true", help="discard partial results instead of resuming")
    p.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two reports side by side with deltas (runs nothing)")


def run(args, load_model) -> int:
    """Body of `foveal eval`; `load_model(reference)` loads a local model with the CLI's options."""
    from . import compare_reports, format_table, load_report
    if args.compare:
        a, b = (load_report(p) for p in args.compare)
        print(compare_reports(a, b, tuple(args.compare)))
        return 0
    if not args.data:
        raise EvalConfigError("foveal eval needs --data FILE (or --compare A.json B.json)")
    if args.api is not None and args.endpoint is None:
        raise EvalConfigError("--api applies to --endpoint; pass the server's URL with --endpoint")
    from .backends import APIS, LocalBackend, endpoint_backend
    if args.api is not None and args.api not in APIS:
        raise EvalConfigError(f"unknown --api {args.api!r}; choose from {', '.join(APIS)}")
    from .datasets import load_dataset
    from .runner import DEFAULT_MAX_TOKENS, run_eval
    dataset = load_dataset(args.data, format=args.format, annotations=args.annotations, images=args.images,
                           limit=args.limit, circular=args.circular, prompt_suffix=args.prompt_suffix)
    if args.endpoint:
        backend = endpoint_backend(args.endpoint, args.api or "openai", model=args.model, api_key=args.api_key)
    else:
        backend = LocalBackend(load_model(args.model))
    print(f"evaluating {len(dataset.items)} item(s) of {dataset.path.name} ({dataset.format})", file=sys.stderr)
    try:
        report = run_eval(dataset, backend, args.out,
                          max_tokens=args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS,
                          restart=args.restart, progress=None, chart=not args.no_chart)
    except KeyboardInterrupt:
        print("interrupted; answers so far are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        backend.close()
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_table(report))
        files = report["files"]
        print(f"report {files['report']}" + (f", chart {files['chart']}" if files["chart"] else "")
              + f", answers {files['predictions']}"
              + (f" ({report['resumed']} resumed from an earlier run)" if report["resumed"] else ""))
    return 0
