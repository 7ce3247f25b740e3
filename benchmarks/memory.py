"""Where weights dominate: peak memory and step time of CoFiTune against full fine-tuning and LoRA.

At 135M parameters the process itself dominates memory, so this uses a random-weight Llama of
0.5B parameters (float32; 16 layers, hidden 1536, FFN 4096, GQA 12/4 heads, vocabulary 32,000,
untied head), big enough that weights, gradients and optimizer state dominate, small enough for a
24 GB CPU machine. Methods, each with gradient checkpointing (non-reentrant) on and off, each in
its own process so that its peak RSS is its own:

- `full`: every parameter trains;
- `cofitune`: `ffn` in `25%-50%` (the package's `select`);
- `cofitune_update`: the same with the update soft mask (`row_masks` + `SoftMask`) built from an
  importance of random gate gradients normalised by the package's `normalize`: its cost does not
  depend on the values;
- `lora`: PEFT LoRA r=16 on all linear layers (`target_modules="all-linear"`).

Each trains with a plain PyTorch loop: forward with labels, backward, torch AdamW, zero_grad
(set to None). Not Axolotl's trainer: its process (datasets, tokenizer, Trainer) adds a gigabyte
or more that is no method's, needs a tokenizer on disk, and its step is this loop plus logging;
the method's memory is what this isolates. Batches are random token ids of a fixed shape.

A last process times the importance pass (`compute_importance`, two forwards and a backward to
the gates per batch) and a search trial's scoring (a forward without gradients), per token,
against the coarse selection's training step. The memory model (`cofitune_plugin.memory_plan`)
is checked against each measured peak: predicted = the process's RSS before the model was built
+ the plan's roles (weights, gradients, moments, mask copy, activations, logits).

    python benchmarks/memory.py                 # about 4-5 minutes on an idle 2-core CPU
    python benchmarks/memory.py --steps 1 --warmup 0 --seq-len 32 --output /tmp/m.json  # smoke
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import describe

from cofitune_plugin.memory_plan import GIB, ModelShape, Setup, model_shape, plan_memory
from cofitune_plugin.selection import select

METHODS = ("full", "cofitune", "cofitune_update", "lora")
LAYERS, MODULES = "25%-50%", "ffn"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16
GOALS = {"peak_rss": 0.35, "seconds_per_step": 0.6}  # CoFiTune / full fine-tuning, at most
MODEL = {
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--importance-batches", type=int, default=2)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "memory-cpu.json"
    )
    parser.add_argument("--worker", choices=[*METHODS, "passes"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_gib() -> float:
    """The process's resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).float()


def update_mask(model, selection):
    """The update soft mask of `selection`, from random importance through the package's code."""
    from cofitune_plugin.softmask import NormalizedImportance, SoftMask, normalize, row_masks

    config = model.config
    layers, generator = config.num_hidden_layers, torch.Generator().manual_seed(0)
    importance = NormalizedImportance(
        head=normalize(torch.randn(layers, config.num_attention_heads, generator=generator)),
        intermediate=normalize(torch.randn(layers, config.intermediate_size, generator=generator)),
        output=normalize(torch.randn(layers, config.hidden_size, generator=generator)),
    )
    return SoftMask(model, row_masks(model, selection, importance), apply_to="update")


def prepare(model, method: str):
    """Freeze or wrap `model` for `method`; returns the model to train and the update mask."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear")
        return get_peft_model(model, config), None
    if method == "full":
        return model, None
    selection = select(model, LAYERS, MODULES)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selection.parameters)
    return model, update_mask(model, selection) if method == "cofitune_update" else None


def batch_of(args: argparse.Namespace, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(
        0, MODEL["vocab_size"], (args.batch_size, args.seq_len), generator=generator
    )
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_method(args: argparse.Namespace) -> dict:
    """One method's training steps in this process: peak RSS, seconds per step, trainable."""
    import peft  # noqa: F401  (imported before the baseline: the libraries are not the method's)
    import transformers  # noqa: F401

    before_model = rss_gib()
    model = build_model()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, soft_mask = prepare(model, args.worker)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    if soft_mask is not None:
        soft_mask.attach_optimizer(optimizer)
    times = []
    for step in range(args.warmup + args.steps):
        batch = batch_of(args, step)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    return {
        "peak_rss_gib": peak_rss_gib(),
        "rss_before_model_gib": before_model,
        "seconds_per_step": sum(timed) / len(timed),
        "step_seconds": timed,
        "trainable": sum(p.numel() for p in trainable),
        "torch_threads": torch.get_num_threads(),
    }


def run_passes(args: argparse.Namespace) -> dict:
    """Seconds per token of the importance pass and of a trial's scoring forward, beside the
    coarse selection's training step, all on the same model in one process."""
    from cofitune_plugin.importance import compute_importance

    model = build_model()
    selection = select(model, LAYERS, MODULES)
    tokens = args.batch_size * args.seq_len
    batches = [batch_of(args, seed) for seed in range(args.importance_batches + 1)]
    architecture = selection.architecture
    compute_importance(
        model, batches[:1], architecture, selection.layer_prefix, estimator="das", progress=False
    )
    start = time.perf_counter()
    raw = compute_importance(
        model, batches[1:], architecture, selection.layer_prefix, estimator="das", progress=False
    )
    importance = (time.perf_counter() - start) / raw.tokens
    model.eval()
    with torch.no_grad():
        model(**batches[0])
        start = time.perf_counter()
        for batch in batches[1:]:
            model(**batch)
        scoring = (time.perf_counter() - start) / (tokens * args.importance_batches)
    return {"importance_seconds_per_token": importance, "scoring_seconds_per_token": scoring}


def in_subprocess(args: argparse.Namespace, worker: str, checkpointing: bool = False) -> dict:
    """Run `worker` in a fresh Python process; its last output line is its JSON result."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        *(["--checkpointing"] if checkpointing else []),
        *("--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *("--importance-batches", str(args.importance_batches)),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_gib(shape: ModelShape, args: argparse.Namespace, method: str, ckpt: bool) -> float:
    """The memory model's peak for one run, without the process's own RSS."""
    setup = Setup(
        launcher="single",
        devices=1,
        weight_bytes=4,
        micro_batch=args.batch_size,
        sequence_len=args.seq_len,
        checkpointing=ckpt,
        update_mask=method == "cofitune_update",
        on_gpu=False,
    )
    return plan_memory(shape, setup).total / GIB


def method_shapes(model) -> dict[str, ModelShape]:
    """Each method's shape for the memory model, from the package's own selection code."""
    coarse = model_shape(model, select(model, LAYERS, MODULES))
    every_linear = select(model, "0%-100%", ALL_LINEAR)
    full = dataclasses.replace(
        model_shape(model, every_linear),
        trainable=sum(p.numel() for p in model.parameters()),
    )
    return {
        "full": full,
        "cofitune": coarse,
        "cofitune_update": coarse,
        "lora": model_shape(model, every_linear, lora_rank=LORA_RANK),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_passes(args) if args.worker == "passes" else run_method(args)
        print(json.dumps(result))
        return result
    started, load_before = time.time(), os.getloadavg()
    with torch.device("meta"):
        meta = build_model()
    shapes = method_shapes(meta)
    runs: dict[str, dict] = {}
    for checkpointing in (False, True):
        mode = "checkpointing" if checkpointing else "no_checkpointing"
        runs[mode] = {}
        for method in METHODS:
            measured = in_subprocess(args, method, checkpointing)
            model_gib = predicted_gib(shapes[method], args, method, checkpointing)
            predicted = measured["rss_before_model_gib"] + model_gib
            measured["predicted_peak_gib"] = predicted
            measured["prediction_error"] = predicted / measured["peak_rss_gib"] - 1
            runs[mode][method] = measured
            print(
                f"{mode:>16} {method:<16} peak {measured['peak_rss_gib']:6.2f} GiB "
                f"(model: {predicted:6.2f}, {100 * measured['prediction_error']:+.1f}%)  "
                f"{measured['seconds_per_step']:6.2f} s/step  "
                f"{measured['trainable']:>12,} trainable",
                flush=True,
            )
    passes = in_subprocess(args, "passes")
    tokens = args.batch_size * args.seq_len
    step_per_token = runs["no_checkpointing"]["cofitune"]["seconds_per_step"] / tokens
    passes["training_step_seconds_per_token"] = step_per_token
    passes["importance_over_training_step"] = (
        passes["importance_seconds_per_token"] / step_per_token
    )
    passes["scoring_over_training_step"] = passes["scoring_seconds_per_token"] / step_per_token
    ratios = {
        mode: {
            method: {
                "peak_rss": runs[mode][method]["peak_rss_gib"] / runs[mode]["full"]["peak_rss_gib"],
                "seconds_per_step": runs[mode][method]["seconds_per_step"]
                / runs[mode]["full"]["seconds_per_step"],
            }
            for method in METHODS
            if method != "full"
        }
        for mode in runs
    }
    errors = [abs(r["prediction_error"]) for mode in runs.values() for r in mode.values()]
    result = {
        "benchmark": "memory",
        "command": " ".join(["python", "benchmarks/memory.py", *(argv or sys.argv[1:])]),
        "machine": describe(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "minutes": (time.time() - started) / 60,
        "dtype": "float32",
        "model": MODEL,
        "model_params": sum(p.numel() for p in meta.parameters()),
        "batch_size": args.batch_size,
        "sequence_len": args.seq_len,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "optimizer": "torch.optim.AdamW (plain PyTorch loop)",
        "goals": {"cofitune_over_full": GOALS},
        "runs": runs,
        "ratios_to_full": ratios,
        "memory_model_abs_error": {"max": max(errors), "mean": sum(errors) / len(errors)},
        "passes": passes,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for mode, by_method in ratios.items():
        coarse = by_method["cofitune"]
        print(
            f"{mode}: CoFiTune / full: peak {coarse['peak_rss']:.2f}x (goal <= "
            f"{GOALS['peak_rss']}), step {coarse['seconds_per_step']:.2f}x (goal <= "
            f"{GOALS['seconds_per_step']})"
        )
    print(
        f"importance: {passes['importance_over_training_step']:.2f}x a CoFiTune training step "
        f"per token; scoring forward: {passes['scoring_over_training_step']:.2f}x"
    )
    print(f"memory model error: max {100 * max(errors):.1f}%; written to {args.output}")
    return result


if __name__ == "__main__":
    main()
