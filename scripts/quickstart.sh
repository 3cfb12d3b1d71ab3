#!/usr/bin/env bash
# Quick start, step 1: set up .venv and ask the default model about the example image.
# Idempotent. Uses the bundled model when foveal ships one; until then it writes a tiny
# random-weight demo model to .foveal-demo/ (so the answer is noise, but every stage runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=()
if ! .venv/bin/python -c "from foveal.bundled import bundled_model_path; bundled_model_path()" 2>/dev/null; then
    [ -f .foveal-demo/config.json ] || .venv/bin/python -m foveal.bundled .foveal-demo >/dev/null
    MODEL=(.foveal-demo)
fi
exec .venv/bin/foveal run "${MODEL[@]}" --image examples/shapes.png "How many shapes are there?" --max-tokens 16 --stats
