#!/usr/bin/env bash
# Set up .venv and run the test suite (tiny models built in temp dirs; no network, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline.env
.venv/bin/ruff check cofitune_plugin tests
.venv/bin/python -m pytest -q tests "$@"
