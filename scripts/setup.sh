#!/usr/bin/env bash
# Create (or reuse) .venv and install foveal into it. Idempotent.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test dependencies, and Debian's chromium for the web page's
#                             browser tests when it is missing and apt-get can install it
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
# The browser tests (tests/test_web.py) drive the system's chromium through Playwright; Playwright's
# own browser download is never used. Without apt-get (or root) those tests skip, saying why.
install_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || { echo "setup: no apt-get; the browser tests will skip" >&2; return 0; }
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n" || {
            echo "setup: not root; install chromium for the browser tests (apt-get install chromium)" >&2; return 0; }
    fi
    echo "setup: installing chromium (Debian package) for the browser tests" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null 2>&1; } \
        || echo "setup: could not install chromium; the browser tests will skip" >&2
    return 0
}
[ "${1:-}" = "test" ] && install_chromium
exit 0
