#!/usr/bin/env bash
# Installs streamscribe with its test dependencies, every engine (NeMo, ONNX, MLX, Moonshine) and
# diarization, then runs lint, type checks and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test,nemo,onnx,mlx,diarization,moonshine
. .venv/bin/activate
# Debian packages the tests drive for real (never skipped): redis-server for the replica tests, nginx for
# the two-replica deployment test (both started by the tests on random loopback ports), Chromium for the
# browser tests (tests/web).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ -z "${STREAMSCRIBE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then missing+=(chromium); fi
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "Missing ${missing[*]} and apt-get is not available: install them (or set STREAMSCRIBE_CHROMIUM)." >&2
    exit 1
  fi
  as_root=""
  if [ "$(id -u)" -ne 0 ]; then as_root="sudo"; fi
  echo "Installing ${missing[*]} for the tests (apt-get)..." >&2
  $as_root apt-get update -q
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    -o DPkg::Lock::Timeout=300 "${missing[@]}"
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
