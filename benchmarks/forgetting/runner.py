"""One method's runs, in one process (so the process's peak memory is the method's).

`python benchmarks/forgetting/runner.py PLAN METHOD [LEARNING_RATE]`, started by
`python benchmarks/forgetting` (several at once: `jobs.py`); PLAN is a stage's plan file.
The runs go through the plugin's training session (`cofitune_plugin.session`): the model and
tokenized data load once through Axolotl; each run sets what trains (a set of parameters or
LoRA adapters), builds Axolotl's trainer (CoFiTune's runs also get the plugin's
`post_trainer_create`: its selection check, report and soft masks), trains, is evaluated on both
axes, and then the base weights come back from the checkpoint on disk. Full fine-tuning's run at
the plan's WiSE-FT rate, and CoFiTune's default at its dial rate, are also evaluated at
base + a (tuned - base) for each of the plan's a
(`cofitune_plugin.dial`, evaluation only). Every finished run is its own record file
(`records.py`) with its per-item results: exact match per held-out item, NLL per general
prompt, each benchmark document's hit. A stopped benchmark resumes where it stopped, and runs
from other sittings add to the same table.
"""

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from dft import dft_loss
from kl import KLToBase
from methods import CURVE_OF, Method, all_methods, trainable_names
from mofo import mofo
from records import (
    BASE_FILE,
    key_of,
    planned_alphas,
    provenance,
    read_base,
    recorded,
    run_file,
    write_record,
)

from cofitune_plugin import evaluation as plugin_evaluation
from cofitune_plugin.dial import Dial
from cofitune_plugin.session import Session, checkpoint_values, exact_patterns

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402

BENCH_METRIC = "acc_norm"  # each general benchmark's score, as lm-eval's papers report it


@dataclass
class Run:
    """What one (method, learning rate, seed) run measured."""

    method: str
    learning_rate: float
    seed: int
    alpha: float | None  # base + a (tuned - base) (WiSE-FT, the dial); None for a trained model
    trainable: int
    exact_match: float
    bench: dict[str, float]  # each general benchmark's accuracy (acc_norm)
    heldout_nll: float
    retention_nll: float
    agreement: float
    train_loss: float
    step_seconds: float
    eval_seconds: float
    peak_accelerator_bytes: int | None
    peak_rss_bytes: int
    # per item: "exact_match" (0/1 per held-out item), "retention" ([NLL sum, tokens] per
    # general prompt), "bench" ({task: {"doc_ids", BENCH_METRIC}})
    items: dict = field(default_factory=dict)
    selection: dict | None = None  # the search's choice, for CoFiTune's default


class MethodRuns:
    """One method's runs on the product's training session (model, data and evaluation sets
    loaded once)."""

    def __init__(self, plan: dict, method: Method, label: str) -> None:
        from cofitune_plugin.search import read_chosen

        work = Path(plan["paths"]["work"])
        self.work, self.plan, self.method = work, plan, method
        self.records = Path(plan["paths"]["records"])
        overrides: dict = {
            "output_dir": str(work / "trainer" / label),
            "save_strategy": "no",
            "cofitune__soft_mask": None,  # so that runs without a mask need no importance
        }
        if method.replay:
            # general text mixed into the domain's rows: its own data, prepared apart
            overrides |= {
                "datasets": [
                    *plan["recipe_datasets"],
                    {
                        "path": plan["paths"][f"replay-{method.replay}"],
                        "ds_type": "json",
                        "type": "completion",
                    },
                ],
                "dataset_prepared_path": str(work / f"prepared-{method.name}"),
            }
        if method.kind == "cofitune":
            chosen = (
                read_chosen(work / "search")
                if method.layers == "search"
                else {"layers": method.layers, "modules": method.modules}
            )
            overrides |= {f"cofitune__{key}": value for key, value in chosen.items()}
            # the recipe's block (its estimator) with this method's mode and the run's importance
            recipe_mask = yaml.safe_load((work / "recipe.yml").read_text())["cofitune"]["soft_mask"]
            overrides["cofitune__soft_mask"] = method.soft_mask and {
                **recipe_mask,
                "importance": str(method.importance(work)),
                "apply_to": method.soft_mask,
            }
        self.session = Session(work / "recipe.yml", **overrides)
        self.tokenizer = self.session.tokenizer
        # the KL term's reference: the base, loaded once (its memory is part of the method's peak)
        self.base_model = None
        if method.kl:
            from transformers import AutoModelForCausalLM

            model = self.session.model
            self.base_model = AutoModelForCausalLM.from_pretrained(
                self.session.cfg.base_model, dtype=model.dtype
            ).to(model.device)
        evaluation, paths = plan["evaluation"], plan["paths"]
        self.special = plugin_evaluation.read_examples(
            paths["speciality_data"], self.tokenizer, evaluation["speciality_limit"]
        )
        self.general = plugin_evaluation.read_examples(
            paths["prompts"], self.tokenizer, evaluation["prompts_limit"]
        )

    def measure_base(self) -> dict:
        evaluation = self.plan["evaluation"]
        prompts = [e.prompt_ids for e in self.general]
        answers = plugin_evaluation.greedy_generate(
            self.session.model,
            self.tokenizer,
            prompts,
            evaluation["answer_tokens"],
            evaluation["batch_size"],
            desc="base answers",
        )
        scores = self._evaluate(answers, self.session.model)
        return {**scores, "answers": answers}

    def train(self, learning_rate: float, seed: int) -> list[Run]:
        """The trained model's run, and at a rate with a curve (`methods.INTERPOLATIONS`) the
        interpolated points' runs."""
        from peft import LoraConfig

        base = read_base(self.records)
        overrides: dict = {"learning_rate": learning_rate, "seed": seed, **self.method.config}
        if self.method.kind == "lora":
            trainable = LoraConfig(task_type="CAUSAL_LM", **self.method.lora)
            overrides |= {"adapter": "lora", "cofitune": None, "unfrozen_parameters": None}
        else:
            trainable = exact_patterns(self._trainable_names(seed))
            if self.method.kind != "cofitune":
                overrides |= {"adapter": None, "cofitune": None, "unfrozen_parameters": None}

        def evaluate(model) -> dict:
            scores = self._evaluate(base["answers"], model)
            return {
                **scores,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }

        # The base weights come back from the checkpoint on disk: no copy is held in memory,
        # which would add a model's size to full fine-tuning's measured peak.
        curve = CURVE_OF.get(self.method.name)
        if alphas := planned_alphas(self.plan, self.method.name, learning_rate):
            evaluate = self._with_interpolation(evaluate, alphas)
        kl = (
            KLToBase(self.session.model, self.base_model, self.method.kl)
            if self.method.kl
            else None
        )
        run = self.session.train(
            trainable,
            evaluate,
            overrides,
            plugin=self.method.kind == "cofitune",
            restore="checkpoint",
            optimizer=(lambda model: mofo(model, learning_rate)) if self.method.mofo else None,
            loss=kl or (dft_loss if self.method.dft else None),
        )
        if kl is not None:
            kl.remove()
        common = {
            "method": self.method.name,
            "learning_rate": learning_rate,
            "seed": seed,
            "trainable": run.trainable,
            "train_loss": run.output.training_loss,
            "step_seconds": run.output.metrics["train_runtime"] / run.output.global_step,
            "peak_accelerator_bytes": run.peak_accelerator_bytes,
        }
        if self.method.layers == "search":
            common["selection"] = {
                "layers": self.session.cfg.cofitune.layers,
                "modules": self.session.cfg.cofitune.modules,
            }
        interpolated = run.evaluation.pop("interpolated", {})
        runs = [Run(alpha=None, **common, **run.evaluation)]
        for alpha, scores in interpolated.items():
            runs.append(Run(**{**common, "method": curve, "alpha": alpha, **scores}))
        return runs

    def _with_interpolation(self, evaluate, alphas: list[float]):
        """`evaluate`, then the same at each point base + a (tuned - base) of what trained (the
        base's values read from its checkpoint; the tuned ones are back afterwards)."""

        def evaluate_with_interpolation(model) -> dict:
            scores = evaluate(model)
            names = [name for name, p in model.named_parameters() if p.requires_grad]
            dial = Dial(model, checkpoint_values(self.session.cfg.base_model, names))
            scores["interpolated"] = {}
            for alpha in alphas:
                print(f"[{self.method.name}] a = {alpha}", flush=True)
                dial.set(alpha)
                scores["interpolated"][alpha] = evaluate(model)
            dial.set(1.0)
            return scores

        return evaluate_with_interpolation

    def _trainable_names(self, seed: int) -> list[str]:
        model = self.session.model
        if self.method.kind == "full":
            return [name for name, _ in model.named_parameters()]
        if self.method.kind == "params":
            return trainable_names(self.method, model, seed)
        block = self.session.cfg.cofitune
        return list(self.session.select(block.layers, block.modules).parameters)

    def _evaluate(self, base_answers: list[list[int]], model) -> dict:
        evaluation = self.plan["evaluation"]
        start = time.perf_counter()
        hits = plugin_evaluation.speciality_hits(
            model,
            self.tokenizer,
            self.special[: evaluation["exact_match_limit"]],
            evaluation["answer_regex"],
            evaluation["speciality_tokens"],
            evaluation["batch_size"],
        )
        heldout = plugin_evaluation.speciality(
            model, self.tokenizer, self.special, "loss", "", 0, evaluation["batch_size"]
        )
        scores = plugin_evaluation.answer_scores(
            model,
            [e.prompt_ids for e in self.general],
            base_answers,
            self.tokenizer.pad_token_id,
            evaluation["batch_size"],
            desc="versatility",
        )
        retention, agreement = plugin_evaluation.pooled(scores)
        bench = {}
        for task, doc_ids in evaluation["bench_doc_ids"].items():
            bench |= plugin_evaluation.lm_eval_results(
                model,
                self.tokenizer,
                [task],
                None,
                None,
                evaluation["bench_batch_size"],
                doc_ids={task: doc_ids},
            )
        return {
            "exact_match": sum(hits) / len(hits),
            "bench": {task: result.metrics[BENCH_METRIC] for task, result in bench.items()},
            "heldout_nll": heldout,
            "retention_nll": retention,
            "agreement": agreement,
            "eval_seconds": time.perf_counter() - start,
            "items": {
                "exact_match": [int(hit) for hit in hits],
                "retention": [[s.nll, s.tokens] for s in scores],
                "bench": {
                    task: {"doc_ids": r.doc_ids, BENCH_METRIC: r.item_metrics[BENCH_METRIC]}
                    for task, r in bench.items()
                },
            },
        }


def main(plan_file: Path, name: str, learning_rate: float | None = None) -> None:
    """Run `name`'s missing runs (at `learning_rate` only, when given), each to its own file."""
    plan = json.loads(plan_file.read_text())
    records = Path(plan["paths"]["records"])
    method = {m.name: m for m in all_methods()}[name]
    label = name if learning_rate is None else f"{name}@{learning_rate:g}"
    where = provenance(REPO, describe())
    if method.kind == "base":
        if read_base(records) is None:
            base = MethodRuns(plan, method, label).measure_base()
            described = {k: v for k, v in plan.items() if k not in ("paths", "key")}
            record = {"plan_key": plan["key"], "plan": described, **where, **base}
            write_record(records / BASE_FILE, record)
        return

    base_key = key_of(read_base(records)["answers"])
    rates = plan["learning_rates"][name] if learning_rate is None else [learning_rate]
    runs = None
    for lr, seed in [(lr, seed) for seed in plan["seeds"] for lr in rates]:
        path = run_file(records, name, lr, seed)
        if recorded(path, planned_alphas(plan, name, lr)):
            continue
        # recorded without the curve the plan now asks of it: trained again, with its points
        earlier = json.loads(path.read_text())["runs"][0] if path.exists() else None
        runs = runs or MethodRuns(plan, method, label)
        print(f"[{name}] lr {lr:g}, seed {seed}", flush=True)
        measured = [asdict(run) for run in runs.train(lr, seed)]
        if earlier is not None:
            print(f"[{name}] trained again for its curve; {_moved(earlier, measured[0])}")
        record = {"plan_key": plan["key"], "base_key": base_key, **where, "runs": measured}
        write_record(path, record)
        print(f"[{name}] written {path}", flush=True)


def _moved(earlier: dict, again: dict) -> str:
    """How far a run trained again moved from its record (on a CPU, not at all)."""
    measures = ("exact_match", "heldout_nll", "retention_nll")
    moved = {m: abs(again[m] - earlier[m]) for m in measures if again[m] != earlier[m]}
    moved |= {
        t: abs(v - earlier["bench"][t])
        for t, v in again["bench"].items()
        if v != earlier["bench"][t]
    }
    return f"moved from its record by {moved}" if moved else "every figure as recorded"


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else None)
