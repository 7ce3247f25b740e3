#!/usr/bin/env bash
# Set up a venv and run the test suite (tiny models built in temp dirs; no network, no GPU).
#   bash scripts/test.sh                   # Python 3.11, Axolotl 0.19.0 (.venv): what CI runs
#   bash scripts/test.sh --axolotl 0.21    # Python 3.12, Axolotl 0.21.0 (.venv-axolotl-0.21); also
#                                          # writes the run's record to docs/compat/axolotl-0.21-cpu.txt
# Other arguments go to pytest, e.g. `-m "not axolotl"` (the fast tier) or `-n 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
axolotl=0.19
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --axolotl) axolotl="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
bash scripts/setup.sh --axolotl "$axolotl"
venv=.venv
[ "$axolotl" = 0.19 ] || venv=".venv-axolotl-$axolotl"
# DeepSpeed (tests only), for tests/test_recipes.py (Axolotl builds a recipe's DeepSpeed config with it): a
# source archive whose setup imports torch, so it builds against the torch setup.sh installed (pure
# Python on CPU, about 30 s without a pip cache). Ray, for the search's Ray backend
# (tests/test_trial_launch.py).
"$venv/bin/pip" install -q --disable-pip-version-check -c "scripts/constraints/axolotl-$axolotl.txt" \
  --no-build-isolation -e ".[deepspeed,ray]"
source scripts/offline.env
source "$venv/bin/activate"  # `axolotl train` launches `accelerate` from PATH
ruff check cofitune_plugin tests benchmarks
# Two workers: most of the time is `axolotl train` subprocesses importing Axolotl on one core, so
# a 2-core CI machine runs two at once. Pass `-n N` to change it (the last -n wins).
pytest=(python -m pytest -q -n 2 --dist worksteal tests ${args[@]+"${args[@]}"})
if [ "$axolotl" = 0.19 ]; then
  exec "${pytest[@]}"
fi
# The other end of the range: keep what it was run on and how it ended, for the README's claim.
record="docs/compat/axolotl-$axolotl-cpu.txt"
log="$(mktemp)"
start=$(date +%s)
set +e
"${pytest[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
mkdir -p docs/compat
{
  echo "# bash scripts/test.sh --axolotl $axolotl ${args[*]+${args[*]}}"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- cofitune_plugin tests || echo ' (+ uncommitted changes)')"
  echo "machine: $(uname -sm), $(nproc) CPU cores, no GPU"
  echo "python: $(python -c 'import platform; print(platform.python_version())')"
  python - <<'PY'
from importlib.metadata import version
for name in ("axolotl", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed"):
    print(f"{name}: {version(name)}")
PY
  echo "pytest exit status: $status; wall: $(( $(date +%s) - start )) s"
  echo "--- pytest, last lines"
  grep -vE '^[.FEsxX]+ *(\[ *[0-9]+%\])?$' "$log" | tail -n 40
} > "$record"
rm -f "$log"
echo "record: $record"
exit "$status"
