"""What soft masks cost under each launcher: step time masked / unmasked under one process, DDP,
FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, the last four on 2 CPU processes over gloo (goal: at most
1.03 each).

The engines are driven directly (torch's `DistributedDataParallel` and `fully_shard`,
`deepspeed.initialize`), and the masks through the plugin's own API, as the plugin binds them at
`on_train_begin`: a `SoftMask` with `sharded.EnginePlacement` on the wrapped model, in `update`
mode on the innermost torch optimizer. Not through `axolotl train`: on CPU processes that needs
the test harness's shims of accelerate (tests/harness), and every launch spends far longer
starting than training, so the few steps that could be interleaved would bury a 3% effect in
noise. What is timed is a training step as the engine runs it (forward, backward, optimizer
step), the same in both.

Machines running this are often shared, so for each engine the variants (unmasked, `update`
mask, `gradient` mask) run interleaved step by step on the same engine instance and batch, in a
rotating order; each ratio is the median of per-round ratios over the rounds undisturbed by
other processes (`softmask_overhead.ratio_stats`), with a bootstrap interval. A masked step binds
its mask before the clock starts and removes it after, so unmasked steps run without hooks.

    python benchmarks/sharded_overhead.py                 # every engine
    python benchmarks/sharded_overhead.py --engines fsdp2 zero3 --rounds 10
"""

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo

import torch
import torch.distributed as dist
from machine import describe
from softmask_overhead import VARIANTS, quiet, ratio_stats, summary
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from two_ranks import on_two_ranks

from cofitune_plugin.selection import select
from cofitune_plugin.sharded import EnginePlacement
from cofitune_plugin.softmask import NormalizedImportance, SoftMask, row_masks

ENGINES = ("one-process", "ddp", "fsdp2", "zero2", "zero3", "zero3-offload")
GOAL = 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per engine")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--layers", default="25%-50%")
    parser.add_argument("--modules", default="ffn", help="comma-separated, e.g. ffn or ffn,mha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "sharded-overhead-cpu.json",
    )
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A Llama from a config (the same on every rank), frozen but for the selection, and row
    masks of the selection from a random importance (what masks cost does not depend on it)."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.num_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    selection = select(model, args.layers, args.modules.split(","))
    for name, param in model.named_parameters():
        param.requires_grad_(name in selection.parameters)
    layers = args.num_layers
    importance = NormalizedImportance(
        head=torch.rand(layers, 8),
        intermediate=torch.rand(layers, args.intermediate),
        output=torch.rand(layers, args.hidden),
    )
    return model, row_masks(model, selection, importance)


def prepare(engine: str, model: nn.Module, args: argparse.Namespace):
    """The engine's model, its step (forward, backward, optimizer step) and the torch optimizer
    that steps the values the placement names (DeepSpeed's inner one over its partitions)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if engine.startswith("zero"):
        import deepspeed

        zero: dict = {"stage": int(engine[4])}
        if engine.endswith("offload"):
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": args.batch_size,
            "gradient_accumulation_steps": 1,
            # a torch optimizer, as the Trainer passes (`adamw_torch`), also with offload
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "zero_optimization": zero,
        }
        # ZeRO-2's flat buffers require grad, and gloo's all-gather writes into them in place
        with torch.no_grad() if engine == "zero2" else nullcontext():
            engine_model, *_ = deepspeed.initialize(
                model=model,
                model_parameters=trainable,
                optimizer=torch.optim.AdamW(trainable, lr=1e-4),
                config=config,
            )

        def step(batch: dict) -> None:
            engine_model.backward(engine_model(**batch, use_cache=False).loss)
            engine_model.step()

        return engine_model.module, step, engine_model.optimizer.optimizer
    wrapped = model
    if engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        wrapped(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, optimizer


def timed_rounds(engine: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times per variant, round by round, rotating the variants' order each round."""
    distributed = dist.is_initialized()
    model, masks = build_model(args)
    module, step, optimizer = prepare(engine, model, args)
    rank = dist.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(args.seed + rank)
    batch = {
        "input_ids": torch.randint(args.vocab, (args.batch_size, args.seq_len), generator=generator)
    }
    batch["labels"] = batch["input_ids"]
    sync: Callable[[], None] = dist.barrier if distributed else (lambda: None)

    def run(variant: str) -> float:
        soft_mask = None
        if variant != "unmasked":
            # Bound again for each masked step, without grad: autograd refuses new views of a
            # ZeRO-2 partition once it was written in place with grad enabled.
            with torch.no_grad():
                soft_mask = SoftMask(module, masks, variant, placement=EnginePlacement())
            if variant == "update":
                soft_mask.attach_optimizer(optimizer)
        sync()
        start = time.perf_counter()
        step(batch)
        sync()
        seconds = time.perf_counter() - start
        if soft_mask is not None:
            soft_mask.remove()
        return seconds

    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_index in range(args.warmup + args.rounds):
        order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
        measured = {variant: run(variant) for variant in order}
        if round_index >= args.warmup:
            for variant, seconds in measured.items():
                times[variant].append(seconds)
    return times


def rank_times(rank: int, engines: list[str], args: argparse.Namespace) -> dict:
    """One of 2 ranks: times each engine in turn (one start-up for all of them)."""
    times = {}
    for engine in engines:
        times[engine] = timed_rounds(engine, args)
        if rank == 0:
            print(f"{engine}: timed", flush=True)
    return times


def measure(engines: list[str], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Step times per engine and variant: one process in this one, the others on 2 spawned."""
    times = {}
    if "one-process" in engines:
        torch.set_num_threads(1)  # as each rank of the others
        times["one-process"] = timed_rounds("one-process", args)
    sharded = [engine for engine in engines if engine != "one-process"]
    if sharded:
        times.update(on_two_ranks(rank_times, sharded, args)[0])
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    load_start = os.getloadavg()
    engines = {}
    for engine, times in measure(args.engines, args).items():
        fastest = min(min(values) for values in times.values())
        calm = [
            quiet([times[v][i] for v in VARIANTS], fastest) for i in range(len(times["unmasked"]))
        ]
        engines[engine] = {
            "step_seconds": {variant: summary(values) for variant, values in times.items()},
            **{
                f"{variant}_ratio": ratio_stats(times[variant], times["unmasked"], calm, args.seed)
                for variant in VARIANTS[1:]
            },
            "times": times,
        }
        line = ", ".join(
            f"{variant} {engines[engine][f'{variant}_ratio']['quiet_paired_median']:.3f}"
            for variant in VARIANTS[1:]
        )
        print(
            f"{engine}: unmasked step {engines[engine]['step_seconds']['unmasked']['median']:.3f}"
            f" s; masked / unmasked: {line} ({sum(calm)} of {len(calm)} rounds undisturbed)",
            flush=True,
        )
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": {**describe(), "deepspeed": _version("deepspeed")},
        "load_average_start_end": [load_start, os.getloadavg()],
        "minutes": (time.time() - started) / 60,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "output"},
        "goal": GOAL,
        "engines": engines,
        "meets_goal": {
            engine: {
                variant: row[f"{variant}_ratio"]["quiet_paired_median"] <= GOAL
                for variant in VARIANTS[1:]
            }
            for engine, row in engines.items()
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load_start} -> {os.getloadavg()}; written to {args.output}")
    return result


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
