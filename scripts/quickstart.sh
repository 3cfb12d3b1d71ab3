#!/usr/bin/env bash
# Quick start, step 1: set up .venv and ask the bundled model about the example image.
# Idempotent. The bundled model (src/foveal/assets/default-model) is foveal's default when no
# model is named; examples/questions.txt lists more questions with their true answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/foveal run --image examples/shapes.png "How many objects are in the image?" --max-tokens 16 --stats
