#!/usr/bin/env bash
# Quick start, command 1: set everything up and run the main job on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hybridep bench "$@"
