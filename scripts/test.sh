#!/usr/bin/env bash
# Set up .venv and run the test suite (tiny models built in temp dirs; no network, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline.env
source .venv/bin/activate  # `axolotl train` launches `accelerate` from PATH
ruff check cofitune_plugin tests benchmarks
python -m pytest -q tests "$@"
