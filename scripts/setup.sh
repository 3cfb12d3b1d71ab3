#!/usr/bin/env bash
# Create (or reuse) .venv and install foveal into it. Idempotent.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test dependencies
# PyTorch: foveal depends on plain `torch`; on a machine without one installed we pin the
# release this project is tested with first, so pip does not pick a newer (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${FOVEAL_TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
# (pip's notes about local index folders that lack a package are noise: drop them)
pip_install() {
    "$VPY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}
if ! "$VPY" -c "import torch" 2>/dev/null; then
    pip_install "torch==${TORCH_VERSION}"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
# --no-build-isolation would skip fetching setuptools again, but a fresh venv may lack it.
pip_install -e ".${extra}"
