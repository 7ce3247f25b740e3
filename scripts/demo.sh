#!/usr/bin/env bash
# Set up .venv, build the embedded SmolLM2-135M-Instruct and its math domain under demo/, search
# the layer window x module set, measure unit importance, then fine-tune with CoFiTune (the chosen
# selection + soft masks) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline.env
source .venv/bin/activate  # `axolotl train` launches `accelerate` from PATH
python -m cofitune_plugin.demo --out demo
axolotl cofitune-search recipes/cofitune-smollm2.yml  # resumable; once finished, only reports
if [ ! -f demo/importance/manifest.json ]; then
  axolotl cofitune-importance recipes/cofitune-smollm2.yml  # soft_mask.max_batches: 16
fi
axolotl train recipes/cofitune-smollm2.yml
echo "Search report: $(pwd)/demo/search/report.md"
echo "CoFiTune model written to $(pwd)/demo/outputs/cofitune-smollm2"
grep -E "^(Domain gain|General ability|Distance from the base)" demo/outputs/cofitune-smollm2/cofitune-report.md
echo "Before/after report: $(pwd)/demo/outputs/cofitune-smollm2/cofitune-report.md"
