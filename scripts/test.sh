#!/usr/bin/env bash
# Installs streamscribe with its test dependencies and every engine (NeMo, ONNX, MLX), then runs lint,
# type checks and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test,nemo,onnx,mlx
. .venv/bin/activate
# The browser tests (tests/web) drive Debian's Chromium headless; install it when missing (never skipped).
if [ -z "${STREAMSCRIBE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "Chromium is missing and apt-get is not available: install Chromium and set STREAMSCRIBE_CHROMIUM." >&2
    exit 1
  fi
  as_root=""
  if [ "$(id -u)" -ne 0 ]; then as_root="sudo"; fi
  echo "Installing Chromium for the browser tests (apt-get)..." >&2
  $as_root apt-get update -q
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
export HF_HUB_OFFLINE=1
ruff check src tests bench
mypy
set +e
python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
exit $status
