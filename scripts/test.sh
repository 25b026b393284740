#!/usr/bin/env bash
# Quick start, command 2: set everything up and run the whole test suite (lint + tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
exec .venv/bin/python -m pytest "$@"
