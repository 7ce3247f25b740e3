"""Parameter bytes each rank holds while the importance runs on DeepSpeed ZeRO-3 partitions, per
estimator, against the whole model's: what `axolotl cofitune-importance` does with a ZeRO-3
recipe, on 2 CPU processes over gloo.

The engine is driven directly, as the command drives it: the model built under
`deepspeed.zero.Init` (partitioned from the start), `deepspeed.initialize` without optimizer
(ZeRO-3 inference: its hooks gather each layer for the forward and backward), and the plugin's
`compute_importance` with `Partitioned(GatheredParameters, engine.empty_partition_cache)`. Not
through Axolotl, whose CPU launch of DeepSpeed needs the test harness (tests/harness).

"Held" is every parameter's materialised data (empty while ZeRO-3 has it released) plus the
rank's own partitions (`ds_tensor`), sampled after every module's forward, on every
`GatheredParameters`, and in the backward each time a module's output gradient arrives (a tensor
hook registered before DeepSpeed's own, so before that module's weights are fetched back).
The ZeRO-3 limits are scaled down to the model (`ZERO`): DeepSpeed's defaults keep up to 1e9
parameters live, more than this model has, which would keep it whole.

    python benchmarks/importance_partitioned.py   # results/importance-partitioned-cpu.json
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo

import torch
from machine import describe
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from two_ranks import on_two_ranks

from cofitune_plugin.architectures import architecture_for
from cofitune_plugin.importance import ESTIMATORS, Partitioned, compute_importance

ZERO = {
    "stage": 3,
    "stage3_param_persistence_threshold": 1000,  # the norms stay whole, as a 70B's do
    "stage3_prefetch_bucket_size": 0,
    "stage3_max_live_parameters": 0,
    "stage3_max_reuse_distance": 0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=344)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "importance-partitioned-cpu.json",
    )
    return parser.parse_args(argv)


class HeldBytes:
    """The most bytes of parameter values one rank held at any sampled moment."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.peak = 0

    def sample(self, *_: object) -> None:
        held = 0
        for param in self.params:
            held += param.data.numel() * param.element_size()
            held += param.ds_tensor.numel() * param.ds_tensor.element_size()
        self.peak = max(self.peak, held)

    def on_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        self.sample()
        tensor = getattr(output, "logits", output)
        if isinstance(output, tuple):
            tensor = output[0]
        if isinstance(tensor, Tensor) and tensor.requires_grad:
            tensor.register_hook(self.sample)

    def whole(self) -> int:
        return sum(param.ds_numel * param.element_size() for param in self.params)


def held_bytes(estimator: str, args: argparse.Namespace) -> dict[str, int]:
    """One importance pass on freshly partitioned weights; this rank's figures."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": ZERO}
    model_config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = LlamaForCausalLM(model_config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(3, args.vocab, (2, 64), generator=generator)}
        for _ in range(args.batches)
    ]
    held = HeldBytes(model)
    gathered = deepspeed.zero.GatheredParameters

    class SampledGather(gathered):
        def __enter__(self) -> None:
            super().__enter__()
            held.sample()

    handle = nn.modules.module.register_module_forward_hook(held.on_forward)
    try:
        compute_importance(
            model,
            batches,
            architecture_for("llama"),
            "model.layers",
            estimator,
            progress=False,
            partitioned=Partitioned(SampledGather, engine.empty_partition_cache),
        )
    finally:
        handle.remove()
    partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in held.params)
    return {"whole": held.whole(), "own_partitions": partition, "peak": held.peak}


def rank_figures(rank: int, args: argparse.Namespace) -> dict:
    """One rank's held bytes per estimator."""
    return {estimator: held_bytes(estimator, args) for estimator in ESTIMATORS}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    ranks = {f"rank-{r}": f for r, f in enumerate(on_two_ranks(rank_figures, args))}
    estimators = {
        estimator: {
            "whole_bytes": ranks["rank-0"][estimator]["whole"],
            "own_partitions_bytes": [ranks[r][estimator]["own_partitions"] for r in ranks],
            "peak_bytes": [ranks[r][estimator]["peak"] for r in ranks],
            "peak_over_whole": max(
                ranks[r][estimator]["peak"] / ranks[r][estimator]["whole"] for r in ranks
            ),
        }
        for estimator in ESTIMATORS
    }
    for estimator, row in estimators.items():
        print(
            f"{estimator}: whole {row['whole_bytes']:,} bytes, peak per rank "
            f"{row['peak_bytes']} ({row['peak_over_whole']:.2f} of the whole)"
        )
    from importlib.metadata import version

    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": {**describe(), "deepspeed": version("deepspeed")},
        "minutes": (time.time() - started) / 60,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "output"},
        "zero_optimization": ZERO,
        "estimators": estimators,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.output}")
    return result


if __name__ == "__main__":
    main()
