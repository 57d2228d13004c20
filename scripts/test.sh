#!/usr/bin/env bash
# Installs streamscribe with its test dependencies, then runs lint, type checks and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
# The replica tests start a real redis-server (Debian package) on a random loopback port.
if ! command -v redis-server >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 redis-server >/dev/null
fi
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
