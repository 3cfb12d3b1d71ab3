#!/usr/bin/env bash
# Quick start, step 2: set up .venv with the test dependencies and run the test suite.
# Idempotent. Extra arguments go to pytest (e.g. `scripts/test.sh -m slow` for the long tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
