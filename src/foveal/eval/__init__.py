"""foveal.eval: score a model, or any OpenAI / Ollama compatible server, on VQA-style benchmarks.

    from foveal.eval import evaluate
    report = evaluate("data/vqa_questions.json", model="path/to/model", limit=200)
    report = evaluate("pope.jsonl", endpoint="http://localhost:11434", api="ollama", model="llava")
    print(report["overall"])        # also written: RUN.json, RUN.predictions.jsonl, RUN.png

Files: VQAv2 (questions + annotations), TextVQA, POPE JSONL, MMBench TSV, LLaVA conversation
JSON. Metrics live in metrics.py, file formats in datasets.py, backends in backends.py, the
run / resume / report logic in runner.py, printing, charts and comparison in report.py.
"""

from __future__ import annotations

from .backends import LocalBackend, OllamaBackend, OpenAIBackend, endpoint_backend
from .datasets import FORMATS, Dataset, Item, load_dataset
from .errors import (EndpointError, EvalConfigError, EvalDataError, EvalDataNotFoundError, EvalError,
                     ResumeMismatchError)
from .metrics import (exact_match, extract_choice, normalize_answer, pope_metrics, pope_parse, rotate_options,
                      vqa_accuracy)
from .report import compare_reports, format_table, load_report, write_chart
from .runner import DEFAULT_MAX_TOKENS, run_eval


def evaluate(data, *, model=None, endpoint: str | None = None, api: str = "openai", api_key: str | None = None,
             format: str = "auto", annotations=None, images=None, limit: int | None = None,
             circular: bool = False, prompt_suffix: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
             out=None, restart: bool = False, progress: bool | None = False, chart: bool = True,
             load_kwargs: dict | None = None) -> dict:
    """Evaluate `model` (a loaded VLM, or a reference for foveal.load) or, with `endpoint`, the
    model named `model` on that server. Returns the report dict (also written to disk)."""
    dataset = load_dataset(data, format=format, annotations=annotations, images=images, limit=limit,
                           circular=circular, prompt_suffix=prompt_suffix)
    if endpoint is not None:
        if model is not None and not isinstance(model, str):
            raise EvalConfigError("with an endpoint, model is the model's name on the server")
        backend = endpoint_backend(endpoint, api, model=model, api_key=api_key)
    else:
        if api_key is not None:
            raise EvalConfigError("api_key applies to an endpoint only")
        if model is None or isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from ..api import load
            model = load(model, **(load_kwargs or {}))
        backend = LocalBackend(model)
    try:
        return run_eval(dataset, backend, out, max_tokens=max_tokens, restart=restart, progress=progress,
                        chart=chart)
    finally:
        backend.close()


__all__ = [
    "FORMATS", "Dataset", "EndpointError", "EvalConfigError", "EvalDataError", "EvalDataNotFoundError",
    "EvalError", "Item", "LocalBackend", "OllamaBackend", "OpenAIBackend", "ResumeMismatchError",
    "compare_reports", "endpoint_backend", "evaluate", "exact_match", "extract_choice", "format_table",
    "load_dataset", "load_report", "normalize_answer", "pope_metrics", "pope_parse", "rotate_options",
    "run_eval", "vqa_accuracy", "write_chart",
]
