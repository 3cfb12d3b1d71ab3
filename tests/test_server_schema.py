"""Schemathesis against the served OpenAPI schema: generated requests (valid and invalid) to every
operation of the real server on loopback must never get a 5xx, and every error must be a JSON body
naming the problem.

Generated bodies name random models, which stop at the 404; half of the request bodies are
therefore rewritten to name the served tiny model (with a 4-token budget), so that fuzzed options,
formats, messages and images reach image decoding, prompt building and generation too.
The example count per operation is bounded (MAX_EXAMPLES) and the examples are derandomized, so CI
runs the same ~20 s every time; for a deeper hunt:
FOVEAL_SCHEMATHESIS_EXAMPLES=300 FOVEAL_SCHEMATHESIS_RANDOM=1 pytest tests/test_server_schema.py -s"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from test_server import MODEL, LiveServer, model_dir, vlm  # noqa: F401 (fixtures)

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("FOVEAL_SCHEMATHESIS_EXAMPLES", "25"))   # per operation and mode
DERANDOMIZE = "FOVEAL_SCHEMATHESIS_RANDOM" not in os.environ
GENERATION_PATHS = ("/api/generate", "/api/chat", "/v1/chat/completions", "/api/v1/analyze")


@pytest.fixture(scope="module")
def live(vlm):
    with LiveServer(vlm, max_images=2, max_body_bytes=2 * 2**20, max_queue=8) as s:
        yield s


def _aimed_at_the_model(path: str, body):
    """The same body, naming the served model and asking for at most 4 tokens."""
    body = {**body, "model": MODEL}
    if path == "/api/v1/analyze":                       # a multipart form: options is JSON text
        body["options"] = json.dumps({"num_predict": 4})
    elif path.startswith("/v1/"):
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = 4
    elif isinstance(body.get("options"), dict) or body.get("options") is None:
        body["options"] = {**(body.get("options") or {}), "num_predict": 4}
    return body


def _aim_some_at_the_model(context, case):
    """Half of the generation requests name the served model, with a 4-token budget."""
    if case.operation.path not in GENERATION_PATHS or not isinstance(case.body, dict):
        return st.just(case)

    def aimed(_):
        case.body = _aimed_at_the_model(case.operation.path, case.body)
        return case

    def not_aimed(_):
        # the upload form's model is optional (the sole served model): name none of them, as elsewhere
        if case.operation.path == "/api/v1/analyze" and not str(case.body.get("model") or "").strip():
            case.body = {**case.body, "model": "not-served"}
        return case
    return st.booleans().map(lambda yes: aimed(yes) if yes else not_aimed(yes))


def error_body_is_json(ctx, response, case):
    """A 4xx names its problem in JSON: Ollama {"error": "..."}, OpenAI {"error": {"message": ...}}."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} with a non-JSON body: {response.content[:200]!r}") from None
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else err
    assert isinstance(message, str) and message, f"error body without a message: {body!r:.200}"
    assert "traceback" not in message.lower() and " at 0x" not in message, message[:200]
    return True


def test_generated_requests_never_get_5xx(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    schema.hook("flatmap_case")(_aim_some_at_the_model)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures, calls, statuses = [], {"aimed": 0, "answered": 0, "all": 0}, {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                calls["all"] += 1
                aimed = isinstance(case.body, dict) and case.body.get("model") == MODEL
                response = case.call(timeout=30)
                calls["aimed"] += aimed
                calls["answered"] += aimed and response.status_code == 200
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error, error_body_is_json])
            try:
                run()
            except Unsatisfiable:     # no invalid input exists (an operation without parameters)
                continue
            except Exception as e:   # noqa: BLE001 - collect every operation's failure, then report
                failures.append(f"{operation.label} ({mode.value}): {str(e)[:1500]}")
    print(f"schemathesis: {len(operations)} operations, {calls}, statuses {sorted(statuses.items())}")
    assert not failures, "\n\n".join(failures)
    assert calls["aimed"] > 10 and calls["answered"] > 0, calls       # some requests did reach the model
    r = httpx.get(live.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
