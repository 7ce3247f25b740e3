"""What the fine level costs: step time with soft masks vs without, and the importance pass.

The issue's goals: a training step with soft masks at most 1.03x the unmasked step on a 2-core CPU
(float32) and at most 1.02x on an H100-class GPU (bf16); and the importance pass, run once before
training, as a fraction of one training epoch. The setting is the demo's: SmolLM2-135M-Instruct,
`ffn` in `25%-50%` (layers 7..14, 14.2M parameters), its math data, batch 4 of 256 tokens, AdamW.

Only the plugin's plain-PyTorch API is used (no Axolotl, no Trainer), so what is timed is the
method itself. Machines running this are often shared, so the three variants (unmasked, `gradient`
mask, `update` mask) run interleaved step by step, in a rotating order, on the same batch within
a round; rounds go on until enough of them were undisturbed by other processes (or time is up),
and the headline ratio is the median of per-round ratios over those rounds, with a bootstrap
interval. The masks' own work is also timed alone (the most load-robust estimate), and the
importance batches are timed within the same rounds.

    python benchmarks/softmask_overhead.py                                   # CPU, float32
    python benchmarks/softmask_overhead.py --device cuda --dtype bfloat16    # GPU, bf16
"""

import argparse
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from cofitune_plugin.importance import RawImportance, compute_importance
from cofitune_plugin.selection import Selection, select
from cofitune_plugin.softmask import SoftMask, combine, row_masks

VARIANTS = ("unmasked", "gradient", "update")
GOALS = {"cpu": 1.03, "cuda": 1.02}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("demo/smollm2-135m-instruct"))
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a model config.json: build that model with random weights instead of loading "
        "--model's (the tokenizer still comes from --model). A step's cost does not depend on the "
        "weights' values, so this measures a larger model's shape, or a machine without the "
        "demo's weights",
    )
    parser.add_argument("--data", type=Path, default=Path("demo/data/train.jsonl"))
    parser.add_argument("--layers", default="25%-50%")
    parser.add_argument("--modules", default="ffn", help="comma-separated, e.g. ffn or ffn,mha")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="parameter dtype; bfloat16 also runs the forward under bf16 autocast, as Axolotl "
        "does with `bf16: true`",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="every row padded/truncated to it")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="undisturbed rounds wanted (a round is one step per variant); rounds go on until "
        "that many were undisturbed or --max-minutes is spent (default 10 on CPU, 50 on GPU)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="stop adding rounds after this many minutes from the start (at least --min-rounds "
        "timed rounds run)",
    )
    parser.add_argument("--min-rounds", type=int, default=3, help="timed rounds run in any case")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds before timing "
        "(default 1 on CPU, 5 on GPU); the first also checks the masks",
    )
    parser.add_argument(
        "--importance-batches",
        type=int,
        default=4,
        help="importance batches timed (K), spread over the timed rounds",
    )
    parser.add_argument(
        "--demo-max-batches",
        type=int,
        default=8,
        help="the demo's `cofitune-importance --max-batches`",
    )
    parser.add_argument(
        "--hook-repeats",
        type=int,
        default=None,
        help="repeats of the hook micro-benchmark (default 20 on CPU, 100 on GPU)",
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file (default benchmarks/results/softmask_overhead_<dev>.json)",
    )
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    args.steps = args.steps or (50 if on_gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.hook_repeats = args.hook_repeats or (100 if on_gpu else 20)
    args.warmup = max(args.warmup, 1)  # the first round checks the masks and builds them
    return args


def load_batches(args: argparse.Namespace, tokenizer, rows: int) -> tuple[list[dict], int]:
    """The first `rows` chats of the train set as fixed-shape batches, and the set's size.

    Padding to --seq-len gives every step the same shape, so step times differ only by the
    variant and the machine's load. Labels are the input ids with padding ignored.
    """
    lines = [line for line in args.data.read_text().splitlines() if line.strip()]
    texts = [
        tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        for line in lines[:rows]
    ]
    batches = []
    for start in range(0, len(texts), args.batch_size):
        encoded = tokenizer(
            texts[start : start + args.batch_size],
            padding="max_length",
            truncation=True,
            max_length=args.seq_len,
            return_tensors="pt",
        )
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batches.append(
            {
                "input_ids": encoded["input_ids"].to(args.device),
                "attention_mask": encoded["attention_mask"].to(args.device),
                "labels": labels.to(args.device),
            }
        )
    return batches, len(lines)


class Clock:
    """Wall-clock timing that waits for the device, so GPU kernels are counted where they run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def train_step(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    autocast: AbstractContextManager,
) -> None:
    """One optimizer step as a trainer does it: forward, backward, step, zero_grad."""
    with autocast:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_masks(
    model: nn.Module,
    batch: dict,
    masks: dict[str, Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    autocast: AbstractContextManager,
    lr: float,
) -> dict[str, float]:
    """Prove both masks act before timing them; returns the worst relative error of each.

    gradient: the masked gradient equals the plain one scaled by the row mask.
    update: on AdamW's first step (no weight decay) every element moves by lr * sign(g), so each
    row's median |change| / lr must equal its mask. It must be the update optimizer's first step.
    """
    params = {name: model.get_parameter(name) for name in masks}

    def gradients() -> dict[str, Tensor]:
        with autocast:
            model(**batch, use_cache=False).loss.backward()
        grads = {name: p.grad.float().clone() for name, p in params.items()}
        model.zero_grad(set_to_none=True)
        return grads

    plain = gradients()
    soft_mask = SoftMask(model, masks, "gradient")
    masked = gradients()
    soft_mask.remove()
    gradient_error = max(
        float((masked[n] - plain[n] * masks[n][:, None]).norm() / plain[n].norm()) for n in params
    )

    before = {name: p.detach().float().clone() for name, p in params.items()}
    train_step(model, batch, optimizers["update"], autocast)
    update_error = 0.0
    for name, p in params.items():
        moved = (p.detach().float() - before[name]).abs().median(dim=1).values / lr
        update_error = max(update_error, float((moved - masks[name]).abs().max()))
    return {"gradient_rel_error": gradient_error, "update_abs_error": update_error}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


DISTURBED = 1.5
"""A step slower than this many times the run's fastest step was disturbed by another process
(on 2 shared cores a step can take 6x as long). The threshold is far above any mask's cost (goal:
3%), so leaving such rounds out drops interference, not overhead."""


def quiet(times: list[float], fastest: float) -> bool:
    return max(times) <= DISTURBED * fastest


def ratio_stats(
    masked: list[float], plain: list[float], quiet_rounds: list[bool], seed: int
) -> dict[str, float]:
    """Ratios masked / unmasked, each robust to load in its own way.

    The headline is paired over the undisturbed rounds: each round's masked step over its own
    unmasked step (same batch, same minute), median over rounds, with a bootstrap 90% interval
    (rounds resampled). Also: over every round (paired median, medians, with the same interval),
    and of minimums (other processes only ever add time, so the least disturbed step is the best
    estimate of the cost itself).
    """
    paired = [m / p for m, p in zip(masked, plain)]
    quiet_paired = [r for r, q in zip(paired, quiet_rounds) if q] or [math.nan]
    rng = random.Random(seed)

    def interval(values: list[float]) -> tuple[float, float]:
        boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
        return boot[int(0.05 * len(boot))], boot[int(0.95 * len(boot)) - 1]

    quiet_p05, quiet_p95 = interval(quiet_paired)
    all_p05, all_p95 = interval(paired)
    return {
        "quiet_rounds": sum(quiet_rounds),
        "quiet_paired_median": statistics.median(quiet_paired),
        "quiet_paired_min": min(quiet_paired),
        "quiet_paired_max": max(quiet_paired),
        "quiet_paired_p05": quiet_p05,
        "quiet_paired_p95": quiet_p95,
        "all_paired_median": statistics.median(paired),
        "all_paired_p05": all_p05,
        "all_paired_p95": all_p95,
        "ratio_of_medians": statistics.median(masked) / statistics.median(plain),
        "ratio_of_minimums": min(masked) / min(plain),
    }


def profile_hooks(
    clock: Clock,
    optimizers: dict[str, torch.optim.Optimizer],
    params: list[Tensor],
    masks: list[Tensor],
    repeats: int,
) -> dict[str, dict[str, float]]:
    """Time the masks' work alone, on the real selected parameters, through SoftMask's public
    API.

    - adamw_step: the unmasked variant's AdamW step alone over the selected parameters.
    - adamw_step_update_masked: the update variant's AdamW step, which runs the update mask's
      step pre- and post-hooks; minus `adamw_step`, that is the update mask's own work.
    - gradient_hook: `grad * mask` per parameter, what the gradient mode's tensor hooks compute.
    """
    keep = [m.to(p.dtype).view(-1, 1) for p, m in zip(params, masks)]
    grads = [torch.randn_like(p) for p in params]

    def gradient_hook() -> None:
        for g, k in zip(grads, keep):
            g * k  # noqa: B018 - the allocation and multiply are the cost being measured

    def step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    pieces: dict[str, Callable[[], object]] = {
        "adamw_step": step(optimizers["unmasked"]),
        "adamw_step_update_masked": step(optimizers["update"]),
        "gradient_hook": gradient_hook,
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(repeats + 1):  # the first round warms the allocator and caches
        for name, fn in pieces.items():
            times[name].append(clock.time(fn))
    return {name: summary(values[1:]) for name, values in times.items()}


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_model(
    model_dir: Path, config: Path | None, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The model whose steps are timed: `model_dir`'s weights, or `config`'s shape at random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    with device:  # initialised where it runs: a 7B model's random init on a CPU takes minutes
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=dtype)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    if not (args.model / "tokenizer_config.json").is_file():
        sys.exit(
            f"{args.model} is not a model directory: run `python -m cofitune_plugin.demo "
            "--out demo` first"
        )
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    clock = Clock(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == torch.bfloat16
        else nullcontext()
    )
    load_start = os.getloadavg()
    start_time = time.monotonic()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, args.config, dtype, device)
    selection: Selection = select(model, args.layers, args.modules.split(","))
    for name, param in model.named_parameters():
        param.requires_grad_(name in selection.parameters)
    params = [model.get_parameter(name) for name in selection.parameters]
    model.train()

    pool = max(args.steps, args.importance_batches) + args.warmup
    batches, train_rows = load_batches(args, tokenizer, pool * args.batch_size)
    steps_per_epoch = math.ceil(train_rows / args.batch_size)

    def optimizer() -> torch.optim.Optimizer:
        # One per variant: AdamW's moments must not mix between variants.
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    optimizers = {variant: optimizer() for variant in VARIANTS}

    def importance_of(batch: dict) -> RawImportance:
        return compute_importance(
            model,
            [batch],
            selection.architecture,
            selection.layer_prefix,
            estimator="das",
            dropout=0.003,
            progress=False,
        )

    # Warm-up round 0: one importance batch gives the masks (their values do not change the
    # cost); then the masks are checked, which is also the update optimizer's first step.
    raw = importance_of(batches[0])
    masks = row_masks(model, selection, combine([raw.tensors()]))
    # the update mask's hooks hold it: it masks every step of its optimizer from here on
    SoftMask(model, masks, "update").attach_optimizer(optimizers["update"])
    checks = check_masks(model, batches[0], masks, optimizers, autocast, args.lr)
    print(f"mask checks (0 = exact): {checks}", flush=True)
    if dtype == torch.float32 and max(checks.values()) > 1e-2:
        # bfloat16 weights round most lr-sized changes away, so only float32 is checked strictly
        sys.exit(f"the soft masks do not act as intended: {checks}")

    def run(variant: str, batch: dict) -> float:
        # A gradient mask's tensor hooks fire in every backward, so it is attached only around
        # its own steps (outside the timed region); the update mask hooks only its optimizer.
        gradient_mask = SoftMask(model, masks, "gradient") if variant == "gradient" else None
        seconds = clock.time(lambda: train_step(model, batch, optimizers[variant], autocast))
        if gradient_mask is not None:
            gradient_mask.remove()
        return seconds

    step_times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    round_loadavg: list[float] = []
    importance_times: list[float] = []
    # Importance batches spread evenly over the first --steps timed rounds, so a burst of load
    # on the machine does not fall on all of them.
    importance_rounds = Counter(
        args.warmup + i * args.steps // args.importance_batches
        for i in range(args.importance_batches)
    )

    def quiet_rounds() -> list[bool]:
        fastest = min(min(times) for times in step_times.values())
        return [quiet(times, fastest) for times in zip(*step_times.values())]

    r = 0
    while True:
        timed = r >= args.warmup
        batch = batches[r % len(batches)]
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate: no variant always runs first
        for variant in order:
            seconds = run(variant, batch)
            if timed:
                step_times[variant].append(seconds)
        for _ in range(importance_rounds[r]):
            importance_times.append(clock.time(lambda b=batch: importance_of(b)))
        if importance_rounds[r]:
            # The importance pass frees gigabytes the next step must fault back in: settle with
            # an untimed step so that cost does not land on whichever variant runs next.
            run("unmasked", batch)
        if not timed and r > 0:
            importance_of(batch)
        r += 1
        if not timed:
            print(f"round {r} warm-up", flush=True)
            continue
        round_loadavg.append(os.getloadavg()[0])
        n_timed, n_quiet = len(round_loadavg), sum(quiet_rounds())
        times = "  ".join(f"{v} {step_times[v][-1]:.3f}s" for v in VARIANTS)
        print(f"round {r} timed {times}  (undisturbed so far: {n_quiet})", flush=True)
        out_of_time = time.monotonic() - start_time > 60 * args.max_minutes
        if n_timed >= args.min_rounds and (
            (n_timed >= args.steps and n_quiet >= args.steps) or out_of_time
        ):
            break

    hooks = profile_hooks(
        clock,
        optimizers,
        params,
        [masks[name] for name in selection.parameters],
        args.hook_repeats,
    )

    steps = {variant: summary(values) for variant, values in step_times.items()}
    quiet_mask = quiet_rounds()
    ratios = {
        variant: ratio_stats(step_times[variant], step_times["unmasked"], quiet_mask, args.seed)
        for variant in ("gradient", "update")
    }
    # The importance pass over the unmasked step, both from undisturbed measurements.
    quiet_unmasked = [t for t, q in zip(step_times["unmasked"], quiet_mask) if q]
    unmasked = statistics.median(quiet_unmasked or step_times["unmasked"])
    quiet_importance = [t for t in importance_times if t <= DISTURBED * min(importance_times)]
    per_batch = statistics.median(quiet_importance)
    epoch_seconds = unmasked * steps_per_epoch
    importance_figures = {
        "batches_timed": len(importance_times),
        "batches_undisturbed": len(quiet_importance),
        "seconds_per_batch": summary(importance_times),
        "seconds_per_batch_undisturbed_median": per_batch,
        "unmasked_step_seconds_undisturbed_median": unmasked,
        "per_batch_over_unmasked_step": per_batch / unmasked,
        "per_batch_over_unmasked_step_minimums": min(importance_times) / steps["unmasked"]["min"],
        "train_set_rows": train_rows,
        "steps_per_epoch": steps_per_epoch,
        "epoch_seconds_estimate": epoch_seconds,
        "fraction_of_epoch_full_train_set": per_batch * steps_per_epoch / epoch_seconds,
        "demo_max_batches": args.demo_max_batches,
        "fraction_of_epoch_demo": per_batch * args.demo_max_batches / epoch_seconds,
    }
    # The masks' own work, timed alone and repeated: a load-robust estimate of the overhead.
    quiet_step = steps["unmasked"]["min"]
    hook_fraction = {
        "update": (hooks["adamw_step_update_masked"]["median"] - hooks["adamw_step"]["median"])
        / quiet_step,
        "gradient": hooks["gradient_hook"]["median"] / quiet_step,
    }
    goal = GOALS.get(device.type)
    result = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": {**machine(device), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "setting": {
            "model": str(args.model),
            "random_weights_from_config": str(args.config) if args.config else None,
            "dtype": args.dtype,
            "autocast": "bfloat16" if dtype == torch.bfloat16 else None,
            "layers": args.layers,
            "modules": args.modules,
            "selected_layers": list(selection.layers),
            "selected_parameters": selection.numel,
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "optimizer": f"AdamW lr={args.lr} weight_decay=0 (one per variant)",
            "warmup_rounds": args.warmup,
            "undisturbed_rounds_wanted": args.steps,
            "max_minutes": args.max_minutes,
            "disturbed_threshold": DISTURBED,
        },
        "timed_rounds": len(round_loadavg),
        "undisturbed_rounds": [i for i, q in enumerate(quiet_mask) if q],
        "round_loadavg_1min": round_loadavg,
        "mask_checks": checks,
        "step_seconds": steps,
        "step_seconds_raw": step_times,
        "ratio_vs_unmasked": ratios,
        "goal_ratio": goal,
        # Headline verdicts: the paired median over undisturbed rounds, and its 95th percentile.
        "meets_goal": (
            {v: ratios[v]["quiet_paired_median"] <= goal for v in ratios} if goal else None
        ),
        "meets_goal_p95": {v: ratios[v]["quiet_paired_p95"] <= goal for v in ratios}
        if goal
        else None,
        "hook_seconds": hooks,
        "hook_seconds_over_unmasked_min_step": hook_fraction,
        "importance": importance_figures,
    }
    report(result)
    output = args.output or Path(f"benchmarks/results/softmask_overhead_{device.type}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {output}")
    return result


def report(result: dict) -> None:
    """A short table of the figures that answer the issue."""
    steps, ratios, hooks, imp, fraction = (
        result["step_seconds"],
        result["ratio_vs_unmasked"],
        result["hook_seconds"],
        result["importance"],
        result["hook_seconds_over_unmasked_min_step"],
    )
    m = result["machine"]
    print(
        f"\n{m.get('gpu', m['processor'])}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{result['setting']['dtype']}, loadavg {m['loadavg_start'][0]:.1f} -> "
        f"{m['loadavg_end'][0]:.1f}; ratios are masked / unmasked step time"
    )
    print(
        f"timed rounds: {result['timed_rounds']}, undisturbed (every step <= "
        f"{result['setting']['disturbed_threshold']}x the fastest): "
        f"{len(result['undisturbed_rounds'])}"
    )
    print(
        f"{'variant':<9} {'median s':>8} {'[min, max] s':>16} | {'undisturbed rounds: paired':>26} "
        f"{'90% CI':>14} {'[min, max]':>12} | {'all rounds':>10} {'of mins':>7} "
        f"{'hooks alone':>11}"
    )
    for variant, t in steps.items():
        spread = f"[{t['min']:.3f}, {t['max']:.3f}]"
        row = f"{variant:<9} {t['median']:>8.3f} {spread:>16}"
        if variant in ratios:
            r = ratios[variant]
            row += (
                f" | {r['quiet_paired_median']:>26.3f} "
                f"[{r['quiet_paired_p05']:.3f}, {r['quiet_paired_p95']:.3f}] "
                f"[{r['quiet_paired_min']:.2f}, {r['quiet_paired_max']:.2f}] | "
                f"{r['all_paired_median']:>10.3f} {r['ratio_of_minimums']:>7.3f} "
                f"{1 + fraction[variant]:>11.4f}"
            )
        print(row)
    print(
        f"goal: masked / unmasked <= {result['goal_ratio']}; undisturbed paired median within "
        f"it: {result['meets_goal']}; its 95th percentile within it: {result['meets_goal_p95']}"
    )
    print(
        "hook pieces alone (median s): "
        + ", ".join(f"{k} {v['median']:.4f}" for k, v in hooks.items())
    )
    print(
        f"importance: {imp['seconds_per_batch_undisturbed_median']:.3f} s/batch "
        f"= {imp['per_batch_over_unmasked_step']:.2f} unmasked steps "
        f"({imp['per_batch_over_unmasked_step_minimums']:.2f} from minimums); as a fraction of "
        f"one epoch ({imp['steps_per_epoch']} steps): "
        f"{imp['fraction_of_epoch_full_train_set']:.3f} over the whole train set, "
        f"{imp['fraction_of_epoch_demo']:.4f} with --max-batches {imp['demo_max_batches']}"
    )


if __name__ == "__main__":
    main()
