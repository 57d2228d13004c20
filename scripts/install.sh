#!/usr/bin/env bash
# Installs streamscribe into ./.venv (created if missing). Usage: scripts/install.sh [extra,...]
# Works on a fresh machine with only Python 3.11+ and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# silero-vad declares torch as a dependency, but we only read its ONNX model (run with onnxruntime).
python -m pip install --quiet --no-deps "silero-vad==6.2.3"
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[$extras]"
else
  python -m pip install --quiet -e .
fi
