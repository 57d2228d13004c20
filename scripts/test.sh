#!/usr/bin/env bash
# Installs streamscribe with its test dependencies, then runs lint, type checks and every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
# tests/deploy runs two replicas behind Debian's nginx: install it when missing (root or passwordless sudo).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null 2>&1; then
  as_root=""
  if [ "$(id -u)" != 0 ]; then as_root="sudo -n"; fi
  if $as_root true 2>/dev/null; then
    $as_root apt-get update -qq
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light \
      || $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
  else
    echo "warning: nginx is missing and cannot be installed without root: tests/deploy will be skipped" >&2
  fi
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
