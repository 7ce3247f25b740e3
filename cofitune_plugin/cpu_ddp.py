"""Multi-process training on a machine without an accelerator (CPU DDP over gloo).

Axolotl 0.19 does not support it, and fails silently: accelerate joins CPU processes (gloo) only
when its state is built with `cpu=True`, which neither Axolotl nor Transformers asks for unless
`ACCELERATE_USE_CPU` is set (`accelerate launch --cpu` sets it, but then starts one process).
So each process of `axolotl train recipe.yml -- --multi_gpu --num_processes 2` trains alone on
the full data set, and all of them write the same output_dir. Axolotl also maps each rank's
model to accelerator device LOCAL_RANK, which transformers refuses on CPU. `enable_cpu_ddp`,
called from the plugin's `register` (the first hook, before Axolotl builds its PartialState),
fixes both, so CPU CI runs the same multi-process launch as a GPU cluster.
"""

import os

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType


def enable_cpu_ddp(cfg: dict) -> bool:
    """On a multi-process launch without an accelerator, join the processes with gloo and keep
    the model on CPU. Returns whether it did; a no-op on one process or with an accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.accelerator.is_available():
        return False
    if cfg.get("deepspeed") or cfg.get("fsdp") or cfg.get("fsdp_config"):
        # Neither runs on CPU in Axolotl 0.19 without patching accelerate's internals, which
        # only the tests do (tests/harness; README, "Multi-process training on CPU"); leave them
        # to the engine rather than train as DDP.
        return False
    # Transformers' TrainingArguments rebuilds accelerate's state later, with cpu=True only when
    # this is set; the state built here serves Axolotl's own barriers before that.
    os.environ["ACCELERATE_USE_CPU"] = "true"
    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(
            "cofitune: a multi-process launch on a machine without an accelerator, but accelerate "
            f"was already set up as {state.distributed_type}, so every process would train alone"
        )
    # Axolotl sets device_map = {"": LOCAL_RANK} (an accelerator index) for every multi-process
    # run; `max_memory` is the key its loader honours instead, and with CPU only it maps the
    # whole model to CPU.
    cfg.setdefault("max_memory", {"cpu": "1024GiB"})
    return True
