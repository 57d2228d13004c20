#!/usr/bin/env bash
# Installs streamscribe with its test dependencies and every engine (NeMo, ONNX, MLX), then runs lint,
# type checks and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test,nemo,onnx,mlx
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check src tests bench
mypy
set +e
python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
exit $status
