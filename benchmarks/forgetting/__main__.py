"""`python benchmarks/forgetting`: speciality against versatility for the methods users pick.

On the embedded SmolLM2-135M-Instruct and the demo's math domain, with one shared budget (same
data, steps, schedule), it trains and evaluates base, full fine-tuning, LoRA, LLaMA-Factory's
layer freezing, Spectrum, HFT and CoFiTune (coarse, with each soft mask, and the search's choice):
a learning-rate sweep per method on the first seed, then the other seeds at the best rate. It
writes results JSON, a Markdown table and a Pareto plot to `--docs`.

Steps, each skipped when its output exists (the records in `--work` make the whole command
resumable): the demo's model and data, the importance (`axolotl cofitune-importance`), the search
(`axolotl cofitune-search`), then one process per method (`runner.py`).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from methods import all_methods  # noqa: E402
from scores import BASE_FILE, RUNS_FILE  # noqa: E402
from summary import markdown, pareto_png, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
BASE_RECIPE = REPO / "recipes" / "cofitune-smollm2.yml"
RECORDS = ("importance", "search", BASE_FILE, RUNS_FILE)  # what a plan's run leaves in --work

# What each budget trains and evaluates. `cpu` fits a 2-core CPU in under two hours; `gpu` is
# the H100 setting of docs/design.md §5 (300 steps of batch 8 at lr 2e-4: full fine-tuning
# forgets).
BUDGETS = {
    "cpu": {
        "training": "20 steps of batch 2, cosine schedule, AdamW, float32",
        "speciality_metric": "heldout_nll",  # 20 steps leave exact match near the floor
        "recipe": {"max_steps": 20, "micro_batch_size": 2, "bf16": False},
        "learning_rates": {"full_lrs": [1e-4, 3e-4], "lora_lrs": [5e-4, 2e-3]},
        "importance_batches": 8,
        "search_trial": {"max_steps": 4, "micro_batch_size": 2},
        "evaluation": {
            "speciality_limit": 40,
            "exact_match_limit": 20,
            "speciality_tokens": 72,
            "prompts_limit": 16,
            "answer_tokens": 32,
            "batch_size": 40,
        },
    },
    "smoke": {  # minutes: checks the pipeline end to end, measures nothing
        "training": "2 steps of batch 2",
        "speciality_metric": "heldout_nll",
        "recipe": {"max_steps": 2, "micro_batch_size": 2, "bf16": False},
        "learning_rates": {"full_lrs": [1e-4], "lora_lrs": [1e-3]},
        "importance_batches": 1,
        "search_trial": {"max_steps": 1, "micro_batch_size": 2},
        "evaluation": {
            "speciality_limit": 2,
            "exact_match_limit": 2,
            "speciality_tokens": 8,
            "prompts_limit": 2,
            "answer_tokens": 4,
            "batch_size": 2,
        },
    },
    "gpu": {
        "training": "300 steps of batch 8, cosine schedule, AdamW, bf16",
        "speciality_metric": "exact_match",
        "recipe": {"max_steps": 300, "micro_batch_size": 8, "bf16": True},
        "learning_rates": {"full_lrs": [5e-5, 2e-4, 5e-4], "lora_lrs": [2e-4, 1e-3, 3e-3]},
        "importance_batches": 32,
        "search_trial": {"max_steps": 50, "micro_batch_size": 8},
        "evaluation": {
            "speciality_limit": 200,
            "exact_match_limit": 200,
            "speciality_tokens": 160,
            "prompts_limit": 40,
            "answer_tokens": 64,
            "batch_size": 64,
        },
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/forgetting", description=__doc__)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at each method's best rate")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="records (default benchmarks/results/forgetting-BUDGET)",
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "forgetting")
    args = parser.parse_args(argv)
    work = (args.work or REPO / "benchmarks" / "results" / f"forgetting-{args.budget}").resolve()
    budget = BUDGETS[args.budget]
    plan = {
        "budget": args.budget,
        "training": budget["training"],
        "speciality_metric": budget["speciality_metric"],
        # The importance and the search read the recipe too (batch size included): in the plan,
        # so their outputs are never reused under another one.
        "recipe": budget["recipe"],
        "importance_batches": budget["importance_batches"],
        "search_trial": budget["search_trial"],
        "seeds": list(range(args.seeds)),
        "learning_rates": budget["learning_rates"],
        "evaluation": {
            **budget["evaluation"],
            "speciality_data": str(DEMO / "data" / "eval.jsonl"),
            "prompts": str(DEMO / "data" / "general_prompts.jsonl"),
            "answer_regex": r"####\s*(-?[\d,]*\.?\d+)",
        },
    }
    work.mkdir(parents=True, exist_ok=True)
    _check_plan(work, plan)

    if not (DEMO / "smollm2-135m-instruct" / "config.json").exists():
        _run([sys.executable, "-m", "cofitune_plugin.demo", "--out", str(DEMO)])
    recipe = _write_recipe(work, budget)
    axolotl = str(Path(sys.executable).with_name("axolotl"))
    if not (work / "importance" / "manifest.json").exists():
        _run(
            [
                axolotl,
                "cofitune-importance",
                str(recipe),
                "--output",
                str(work / "importance"),
                "--max-batches",
                str(budget["importance_batches"]),
            ]
        )
    if not (work / "search" / "chosen.yml").exists():
        _run([axolotl, "cofitune-search", str(recipe)])

    methods = all_methods(**plan["learning_rates"])
    runner = Path(__file__).with_name("runner.py")
    for method in methods:  # base first (its answers), then full (the Spec reference)
        print(f"== {method.name}: {method.description}", flush=True)
        _run([sys.executable, str(runner), str(work), method.name])

    command = "python benchmarks/forgetting " + " ".join(argv if argv is not None else sys.argv[1:])
    results = summarize(work, methods, _machine(), command.strip())
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / f"results-{args.budget}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.docs / f"results-{args.budget}.md").write_text(table)
    pareto_png(results, args.docs / f"pareto-{args.budget}.png")
    print(table)
    print(f"written: results-{args.budget}.json, .md and pareto-{args.budget}.png in {args.docs}")


def _write_recipe(work: Path, budget: dict) -> Path:
    """The demo recipe, pointed at this benchmark's records, at the budget's length."""
    recipe = yaml.safe_load(BASE_RECIPE.read_text())
    block = recipe["cofitune"]
    block.pop("from_search")
    block |= {"layers": "25%-50%", "modules": "ffn"}
    block["search"] |= {"output_dir": str(work / "search"), "trial": budget["search_trial"]}
    block["soft_mask"]["importance"] = str(work / "importance")
    recipe |= budget["recipe"] | {
        "base_model": str(DEMO / "smollm2-135m-instruct"),
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "trainer"),
        "logging_steps": 5,
    }
    recipe["datasets"][0]["path"] = str(DEMO / "data" / "train.jsonl")
    for key, name in (("speciality", "data"), ("versatility", "prompts")):
        block["search"][key][name] = str(DEMO / "data" / Path(block["search"][key][name]).name)
    path = work / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


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


def _machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    return {
        "description": gpu or cpu,
        "cpu": cpu,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


if __name__ == "__main__":
    main()
