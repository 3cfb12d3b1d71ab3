"""Prometheus text-format metrics without a client library: counters, gauges and histograms.

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms, base units).
Thread-safe: generation threads record stage timings while the event loop serves /metrics.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        for name, kind, text in (
            ("foveal_requests_total", "counter", "HTTP requests by route and status"),
            ("foveal_errors_total", "counter", "Error responses by kind"),
            ("foveal_prompt_tokens_total", "counter", "Prompt tokens processed"),
            ("foveal_generated_tokens_total", "counter", "Tokens generated"),
            ("foveal_queue_depth", "gauge", "Requests admitted and not finished, per model"),
            ("foveal_models_loaded", "gauge", "Models currently loaded"),
            ("foveal_request_duration_seconds", "histogram", "HTTP request duration by route"),
            ("foveal_time_to_first_token_seconds", "histogram", "Time from admission to the first token"),
            ("foveal_stage_duration_seconds", "histogram", "Per-stage latency: preprocess, encode, "
                                                            "prefill, decode"),
        ):
            self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hist[name].get(key)
            if h is None:
                h = self._hist[name][key] = [[0] * len(LATENCY_BUCKETS), 0.0, 0]
            for i, b in enumerate(LATENCY_BUCKETS):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def render(self) -> str:
        out = []
        with self._lock:
            for name, (kind, text) in self._help.items():
                out.append(f"# HELP {name} {text}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for labels, v in self._counters.get(name, {}).items():
                        out.append(f"{name}{_labels(labels)} {v:g}")
                elif kind == "gauge":
                    for labels, v in self._gauges.get(name, {}).items():
                        out.append(f"{name}{_labels(labels)} {v:g}")
                else:
                    for labels, (counts, total, n) in self._hist.get(name, {}).items():
                        for b, c in zip(LATENCY_BUCKETS, counts):
                            out.append(f"{name}_bucket{_labels(labels + (('le', f'{b:g}'),))} {c}")
                        out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {n}")
                        out.append(f"{name}_sum{_labels(labels)} {total:g}")
                        out.append(f"{name}_count{_labels(labels)} {n}")
        return "\n".join(out) + "\n"
