#!/usr/bin/env bash
# Set up .venv and run the test suite (tiny models built in temp dirs; no network, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeed (tests only), for tests/test_recipes.py (Axolotl builds a recipe's DeepSpeed config with it): a
# source archive whose setup imports torch, so it builds against the CPU torch setup.sh installed (pure
# Python on CPU, about 30 s without a pip cache).
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e ".[deepspeed]"
source scripts/offline.env
source .venv/bin/activate  # `axolotl train` launches `accelerate` from PATH
ruff check cofitune_plugin tests benchmarks
# Two workers: most of the time is `axolotl train` subprocesses importing Axolotl on one core, so
# a 2-core CI machine runs two at once. Pass `-n N` to change it (the last -n wins).
python -m pytest -q -n 2 --dist worksteal tests "$@"
