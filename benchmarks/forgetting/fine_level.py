"""`python benchmarks/forgetting/fine_level.py`: does a soft mask beat a mask with no information?

The fine level scales each trained row's change by 1 - I, I the unit's importance. Any such mask
damps training, and damping alone keeps more of the base model, so the control is the same mask
with no information: the same values of I permuted at random within each layer and unit type
(equal strength, equal distribution per layer). In the forgetting benchmark's regime (the
embedded SmolLM2-135M-Instruct, the dates domain, its `cpu` budget, `benchmarks/forgetting`),
CoFiTune's coarse selection (`ffn` in `25%-50%`) is trained at the budget's selection rate with

- `none`: no mask;
- `<estimator>`: the mask of each estimator whose split-half Spearman at the default budget is
  at least 0.8 on every unit type (`benchmarks/results/importance-estimators-cpu.json`; the
  importance over the default number of batches of the benchmark's general text);
- `<estimator>-permuted`: that mask's values permuted (seed 0),

at --seeds seeds, and scored as the benchmark scores every run (exact match and held-out NLL on
the domain, general benchmarks, retention). The summary (`docs/fine-level/results-cpu.json` and
`.md`) gives each row's mean and SD over the seeds and, per seed, the paired difference
estimator - permuted on retention and benchmark accuracy, with a t interval over the seeds.

Steps, each skipped when its output exists (resumable, like the benchmark): the demo's model, the
benchmark's data, recipe and base model (`runner.py WORK base`), one importance per estimator
(`axolotl cofitune-importance`) and its permuted copy, then one process per (row, seed).
"""

import argparse
import importlib.util
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from jobs import Job, run_jobs  # noqa: E402
from machine import describe  # noqa: E402
from methods import Method  # noqa: E402
from scores import BASE_FILE, vers_bench, vers_retention  # noqa: E402

from cofitune_plugin.importance import ESTIMATORS, RawImportance  # noqa: E402
from cofitune_plugin.importance_store import (  # noqa: E402
    IMPORTANCE_FILE,
    MANIFEST_FILE,
    save_importance,
)
from cofitune_plugin.jsonl import append_record, read_records  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS_FILE = "runs.jsonl"
STABLE = 0.8  # the split-half Spearman an estimator needs, on every unit type, to be tried
LAYERS, MODULES = "25%-50%", "ffn"  # the benchmark's coarse selection
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def _forgetting():
    """The forgetting benchmark's plan and recipe builders (its `__main__.py`)."""
    spec = importlib.util.spec_from_file_location("forgetting_main", HERE / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stable_estimators(stability: dict, threshold: float = STABLE) -> dict[str, float]:
    """Estimator -> its split-half Spearman at the default budget (the lowest over unit types),
    for each estimator measured in `stability` (`importance_stability.py`'s results)."""
    default = stability["setting"]["default_batches"]
    return {
        name: min(unit["spearman"] for unit in figures["by_batches"][str(default)].values())
        for name, figures in stability["estimators"].items()
    } | {"_threshold": threshold}


def permuted(raw: RawImportance, seed: int) -> RawImportance:
    """`raw` with each layer's scores of each unit type shuffled: the same values, and so the
    same mask strength per layer, on units chosen at random."""
    generator = torch.Generator().manual_seed(seed)

    def shuffle(scores: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [row[torch.randperm(row.numel(), generator=generator)] for row in scores]
        )

    return RawImportance(
        **{unit: shuffle(tensor) for unit, tensor in raw.tensors().items()},
        tokens=raw.tokens,
        estimator=raw.estimator,
    )


def write_permuted(source: Path, target: Path, seed: int = 0) -> None:
    """A permuted copy of the importance in `source`, its manifest saying so."""
    from safetensors.torch import load_file

    manifest = json.loads((source / MANIFEST_FILE).read_text())
    tensors = load_file(source / IMPORTANCE_FILE)
    raw = RawImportance(**tensors, tokens=manifest["tokens"], estimator=manifest["estimator"])
    manifest["control"] = f"values permuted within each layer and unit type, seed {seed}"
    save_importance(permuted(raw, seed), target, manifest, overwrite=True)


def rows(estimators: list[str]) -> list[str]:
    return ["none"] + [name for e in estimators for name in (e, f"{e}-permuted")]


def row_work(work: Path, row: str) -> Path:
    """A run's folder as the benchmark's runner expects one: the recipe (with the row's
    estimator), the base's scores and the row's importance as `importance`."""
    folder = work / "rows" / row
    if (folder / "recipe.yml").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load((work / "recipe.yml").read_text())
    if row != "none":
        recipe["cofitune"]["soft_mask"]["estimator"] = row.removesuffix("-permuted")
        (folder / "importance").symlink_to(work / f"importance-{row}")
    (folder / BASE_FILE).symlink_to(work / BASE_FILE)
    (folder / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


def run(work: Path, row: str, seed: int) -> None:
    """Train and score one (row, seed); append it to WORK/runs.jsonl."""
    from runner import MethodRuns

    plan = json.loads((work / "plan.json").read_text())
    rate = plan["learning_rates"]["selection"][0]
    method = Method(
        f"cofitune-{row}",
        "cofitune",
        (rate,),
        layers=LAYERS,
        modules=MODULES,
        soft_mask=None if row == "none" else "update",
    )
    runs = MethodRuns(row_work(work, row), plan, method, f"{row}-seed{seed}")
    (result,) = runs.train(rate, seed)
    append_record(work / RUNS_FILE, {"row": row, **asdict(result)})


def summarize(work: Path, stability: dict, estimators: list[str], seeds: list[int]) -> dict:
    """Each row's mean and SD over the seeds; per estimator, the paired differences from its
    permuted control; the default estimator this measurement supports (or none)."""
    base = json.loads((work / BASE_FILE).read_text())
    runs = read_records(work / RUNS_FILE, dict)
    by_row: dict[str, dict[int, dict]] = {}
    for record in runs:
        by_row.setdefault(record["row"], {})[record["seed"]] = {
            "spec": record["exact_match"],
            "heldout_nll": record["heldout_nll"],
            "vers_bench": vers_bench(record, base),
            "vers_retention": vers_retention(record, base),
        }
    table = []
    for row in rows(estimators):
        scores = [by_row.get(row, {}).get(seed) for seed in seeds]
        done = [s for s in scores if s is not None]
        entry = {"mask": row, "seeds": [seed for seed, s in zip(seeds, scores) if s]}
        for key in ("spec", "heldout_nll", "vers_bench", "vers_retention"):
            values = [s[key] for s in done]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{key}_per_seed"] = values
        table.append(entry)
    paired = {}
    for estimator in estimators:
        mine, control = by_row.get(estimator, {}), by_row.get(f"{estimator}-permuted", {})
        common = [seed for seed in seeds if seed in mine and seed in control]
        paired[estimator] = {
            "seeds": common,
            **{
                key: paired_difference([mine[s][key] - control[s][key] for s in common])
                for key in ("spec", "vers_bench", "vers_retention")
            },
        }
    stable = stable_estimators(stability)
    default = [
        e
        for e, d in paired.items()
        if stable.get(e, 0) >= STABLE
        and d["vers_retention"]["ci95"]
        and d["vers_retention"]["ci95"][0] > 0
        and d["vers_bench"]["ci95"][0] > -0.01
    ]
    default.sort(key=lambda e: paired[e]["vers_retention"]["mean"], reverse=True)
    return {
        "default_estimator": default[0] if default else None,
        "rule": (
            "an estimator is tried if its split-half Spearman at the default budget is >= "
            f"{STABLE} on every unit type; it becomes the default if the 95% interval of its "
            "paired retention difference from its permuted control lies above 0 and that of "
            "the benchmark difference above -0.01 (the largest retention difference wins); "
            "else the default is no mask"
        ),
        "stability": {name: value for name, value in stable.items() if name[0] != "_"},
        "effect": {
            "budget": json.loads((work / "plan.json").read_text())["budget"],
            "seeds": seeds,
            "learning_rate": json.loads((work / "plan.json").read_text())["learning_rates"][
                "selection"
            ][0],
            "selection": {"layers": LAYERS, "modules": MODULES},
            "rows": table,
            "paired_vs_permuted": paired,
        },
    }


def paired_difference(differences: list[float]) -> dict:
    """Mean, SD and a 95% t interval of per-seed paired differences."""
    n = len(differences)
    if n < 2:
        return {"per_seed": differences, "mean": None, "sd": None, "ci95": None}
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"per_seed": differences, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def markdown(results: dict) -> str:
    effect = results["effect"]
    lines = [
        "# The fine level against a mask with no information",
        "",
        f"CoFiTune's coarse selection (`{LAYERS}` x `{MODULES}`) trained at "
        f"{effect['learning_rate']:g} in the forgetting benchmark's `{effect['budget']}` "
        f"regime, seeds "
        f"{effect['seeds']}. Spec: held-out exact match; Vers bench: mean accuracy of the "
        "general benchmarks over the base's; Vers retention: base NLL / tuned NLL of the base's "
        "own answers to general prompts. Mean (SD) over the seeds.",
        "",
        "Split-half Spearman of each estimator's importance at the default budget (lowest unit "
        "type): "
        + ", ".join(f"{name} {value:.3f}" for name, value in results["stability"].items())
        + f"; tried when >= {STABLE}.",
        "",
        "| mask | seeds | Spec | held-out NLL | Vers bench | Vers retention |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in effect["rows"]:
        cells = [
            _mean_sd(row, key) for key in ("spec", "heldout_nll", "vers_bench", "vers_retention")
        ]
        lines.append(f"| {row['mask']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired by seed, estimator - its permuted control (mean, 95% t interval over seeds):",
        "",
        "| estimator | seeds | Spec | Vers bench | Vers retention |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, paired in effect["paired_vs_permuted"].items():
        cells = [_interval(paired[key]) for key in ("spec", "vers_bench", "vers_retention")]
        lines.append(f"| {name} | {len(paired['seeds'])} | " + " | ".join(cells) + " |")
    default = results["default_estimator"]
    lines += [
        "",
        f"Rule: {results['rule']}.",
        "",
        f"**Default this measurement supports: {default or 'no mask'}.**",
        "",
    ]
    return "\n".join(lines)


def _mean_sd(row: dict, key: str) -> str:
    mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ({sd:.4f})" if sd is not None else "")


def _interval(paired: dict) -> str:
    if paired["mean"] is None:
        return "-"
    low, high = paired["ci95"]
    return f"{paired['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/forgetting/fine_level.py")
    parser.add_argument("--budget", choices=["cpu", "smoke"], default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--stability",
        type=Path,
        default=REPO / "benchmarks" / "results" / "importance-estimators-cpu.json",
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "benchmarks" / "results" / "fine-level-cpu"
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "fine-level")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once")
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=ESTIMATORS,
        default=None,
        help="the estimators to run (default: those --stability finds stable); only a stable "
        "one can become the default",
    )
    parser.add_argument("--run", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if args.run:
        run(work, args.run[0], int(args.run[1]))
        return
    started = time.perf_counter()
    if args.estimators:
        estimators = args.estimators
    else:
        spearman = stable_estimators(json.loads(args.stability.read_text()))
        estimators = [e for e in ESTIMATORS if spearman.get(e, 0) >= STABLE]
    print(f"rows: {rows(estimators)}")
    seeds = list(range(args.seeds))

    forgetting = _forgetting()
    budget = forgetting.BUDGETS[args.budget]
    plan = forgetting.make_plan(args.budget, args.seeds, work)
    work.mkdir(parents=True, exist_ok=True)
    forgetting._check_plan(work, plan)
    if not (forgetting.DEMO / "smollm2-135m-instruct" / "config.json").exists():
        forgetting._run(
            [sys.executable, "-m", "cofitune_plugin.demo", "--out", str(forgetting.DEMO)]
        )
    data = work / "data"
    if not (data / "dev.jsonl").exists():
        from cofitune_plugin.demo.dates_domain import write_dates_dataset

        write_dates_dataset(data, **{k: v for k, v in plan["domain"].items() if k != "name"})
        forgetting._write_general_text(data / "general_text.jsonl", plan["general_text"])
    recipe = forgetting._write_recipe(work, budget)

    axolotl = str(Path(sys.executable).with_name("axolotl"))
    jobs = [
        Job(
            "base",
            [sys.executable, str(HERE / "runner.py"), str(work), "base"],
            (work / BASE_FILE).exists,
        )
    ]
    for estimator in estimators:
        variant = yaml.safe_load(recipe.read_text())
        # the product's default budget: the recipe's own soft_mask.max_batches stays unset
        variant["cofitune"]["soft_mask"]["estimator"] = estimator
        path = work / f"recipe-{estimator}.yml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        target = work / f"importance-{estimator}"
        command = [axolotl, "cofitune-importance", str(path), "--output", str(target)]
        jobs.append(
            Job(
                f"importance-{estimator}", command, (target / MANIFEST_FILE).exists, after=("base",)
            )
        )
    run_jobs(jobs, args.jobs, work / "logs", REPO)
    for estimator in estimators:
        if not (work / f"importance-{estimator}-permuted" / MANIFEST_FILE).exists():
            write_permuted(
                work / f"importance-{estimator}", work / f"importance-{estimator}-permuted"
            )

    done = {(r["row"], r["seed"]) for r in read_records(work / RUNS_FILE, dict)}
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--run"]
    runs = [
        Job(f"{row}-seed{seed}", [*me, row, str(seed)], lambda r=row, s=seed: (r, s) in done)
        for seed in seeds
        for row in rows(estimators)
    ]
    run_jobs(runs, args.jobs, work / "logs", REPO)

    results = summarize(work, json.loads(args.stability.read_text()), estimators, seeds)
    results |= {
        "command": "python benchmarks/forgetting/fine_level.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - started,
        "stability_file": str(args.stability.relative_to(REPO))
        if args.stability.is_relative_to(REPO)
        else str(args.stability),
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / f"results-{args.budget}.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.docs / f"results-{args.budget}.md").write_text(table)
    print(table)
    shutil.rmtree(work / "trainer", ignore_errors=True)


if __name__ == "__main__":
    main()
