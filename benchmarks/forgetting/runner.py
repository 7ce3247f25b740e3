"""One method's runs, in one process (so the process's peak memory is the method's).

`python benchmarks/forgetting/runner.py WORK METHOD`, started by `python benchmarks/forgetting`.
The model and tokenized data load once through Axolotl; each run sets what trains, builds
Axolotl's trainer with `setup_trainer` (CoFiTune's runs also get the plugin's
`post_trainer_create`: its selection check, report and soft masks), trains, is evaluated on both
axes, and then the base weights come back from the checkpoint on disk. Every finished run is one
fsynced line in WORK/runs.jsonl, so a stopped benchmark resumes where it stopped.
"""

import gc
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from methods import Method, all_methods, trainable_names
from scores import BASE_FILE, RUNS_FILE, best_learning_rate, read_runs

from cofitune_plugin.evaluation import answer_nll, greedy_generate, read_examples, speciality


@dataclass
class Run:
    """What one (method, learning rate, seed) run measured."""

    method: str
    learning_rate: float
    seed: int
    trainable: int
    exact_match: float
    heldout_nll: float
    retention_nll: float
    agreement: float
    train_loss: float
    step_seconds: float
    eval_seconds: float
    peak_accelerator_bytes: int | None
    peak_rss_bytes: int


class Session:
    """The loaded model, data and evaluation sets of one method's process."""

    def __init__(self, work: Path, plan: dict, method: Method) -> None:
        from axolotl.cli.config import load_cfg
        from axolotl.common.datasets import load_datasets
        from axolotl.train import setup_model_and_tokenizer

        from cofitune_plugin.search import read_chosen

        self.work, self.plan, self.method = work, plan, method
        overrides: dict = {"output_dir": str(work / "trainer"), "save_strategy": "no"}
        if method.kind == "cofitune":
            chosen = (
                read_chosen(work / "search")
                if method.layers == "search"
                else {"layers": method.layers, "modules": method.modules}
            )
            overrides |= {f"cofitune__{key}": value for key, value in chosen.items()}
            overrides["cofitune__soft_mask"] = method.soft_mask and {
                "importance": str(work / "importance"),
                "apply_to": method.soft_mask,
            }
        self.cfg = load_cfg(str(work / "recipe.yml"), **overrides)
        self.data = load_datasets(cfg=self.cfg)
        self.model, self.tokenizer, _, self.processor = setup_model_and_tokenizer(self.cfg)
        evaluation = plan["evaluation"]
        self.special = read_examples(
            evaluation["speciality_data"], self.tokenizer, evaluation["speciality_limit"]
        )
        self.general = read_examples(
            evaluation["prompts"], self.tokenizer, evaluation["prompts_limit"]
        )

    def measure_base(self) -> dict:
        evaluation = self.plan["evaluation"]
        prompts = [e.prompt_ids for e in self.general]
        answers = greedy_generate(
            self.model,
            self.tokenizer,
            prompts,
            evaluation["answer_tokens"],
            evaluation["batch_size"],
            desc="base answers",
        )
        scores = self._evaluate(answers)
        return {**scores, "answers": answers}

    def train(self, learning_rate: float, seed: int) -> Run:
        from axolotl.integrations.base import PluginManager
        from axolotl.utils.dict import DictDefault
        from axolotl.utils.trainer import setup_trainer
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        base = json.loads((self.work / BASE_FILE).read_text())
        set_seed(seed)  # before the adapters are made: LoRA's A matrices are random
        cfg = DictDefault(dict(self.cfg))
        cfg.learning_rate, cfg.seed = learning_rate, seed
        model = self.model
        if self.method.kind == "lora":
            model = get_peft_model(
                self.model, LoraConfig(task_type="CAUSAL_LM", **self.method.lora)
            )
            cfg.adapter, cfg.cofitune, cfg.unfrozen_parameters = "lora", None, None
        else:
            names = set(self._trainable_names(seed))
            for name, param in model.named_parameters():
                param.requires_grad_(name in names)
            if self.method.kind != "cofitune":
                cfg.adapter, cfg.cofitune, cfg.unfrozen_parameters = None, None, None
        trained = [name for name, p in self.model.named_parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer = setup_trainer(
            cfg,
            self.data.train_dataset,
            self.data.eval_dataset,
            model,
            self.tokenizer,
            self.processor,
            self.data.total_num_steps,
        )
        if self.method.kind == "cofitune":
            PluginManager.get_instance().post_trainer_create(cfg, trainer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        output = trainer.train()
        peak_accelerator = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        del trainer
        gc.collect()

        scores = self._evaluate(base["answers"], model)
        run = Run(
            method=self.method.name,
            learning_rate=learning_rate,
            seed=seed,
            trainable=trainable,
            **scores,
            train_loss=output.training_loss,
            step_seconds=output.metrics["train_runtime"] / output.global_step,
            peak_accelerator_bytes=peak_accelerator,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        if self.method.kind == "lora":
            self.model = model.unload()  # the base modules back, adapters dropped
        else:
            self._restore(trained)
        return run

    def _trainable_names(self, seed: int) -> list[str]:
        from cofitune_plugin.selection import select_parameters

        if self.method.kind == "full":
            return [name for name, _ in self.model.named_parameters()]
        if self.method.kind == "params":
            return trainable_names(self.method, self.model, seed)
        config = self.model.config.get_text_config()
        block = self.cfg.cofitune
        return list(
            select_parameters(
                self.model, config.model_type, config.num_hidden_layers, block.layers, block.modules
            ).parameters
        )

    @torch.no_grad()
    def _restore(self, names: list[str]) -> None:
        """Copy the trained parameters back from the checkpoint (no copy is held in memory,
        which would add a model's size to full fine-tuning's measured peak)."""
        from safetensors import safe_open

        wanted = set(names)
        for path in sorted(Path(self.cfg.base_model).glob("*.safetensors")):
            with safe_open(str(path), "pt") as checkpoint:
                for name in wanted.intersection(checkpoint.keys()):
                    self.model.get_parameter(name).copy_(checkpoint.get_tensor(name))
                    wanted.discard(name)
        if wanted:
            raise RuntimeError(f"not in the checkpoint, cannot restore: {sorted(wanted)[:5]}")

    def _evaluate(self, base_answers: list[list[int]], model=None) -> dict:
        model = self.model if model is None else model
        evaluation = self.plan["evaluation"]
        start = time.perf_counter()
        exact = speciality(
            model,
            self.tokenizer,
            self.special[: evaluation["exact_match_limit"]],
            "exact_match",
            evaluation["answer_regex"],
            evaluation["speciality_tokens"],
            evaluation["batch_size"],
        )
        heldout = speciality(
            model, self.tokenizer, self.special, "loss", "", 0, evaluation["batch_size"]
        )
        retention, agreement = answer_nll(
            model,
            [e.prompt_ids for e in self.general],
            base_answers,
            self.tokenizer.pad_token_id,
            evaluation["batch_size"],
            desc="versatility",
        )
        return {
            "exact_match": exact,
            "heldout_nll": heldout,
            "retention_nll": retention,
            "agreement": agreement,
            "eval_seconds": time.perf_counter() - start,
        }


def append_run(work: Path, run: Run) -> None:
    with open(work / RUNS_FILE, "a") as f:
        f.write(json.dumps(asdict(run)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(work: Path, name: str) -> None:
    plan = json.loads((work / "plan.json").read_text())
    method = {m.name: m for m in all_methods(**plan["learning_rates"])}[name]
    seeds = plan["seeds"]
    session = None

    if method.kind == "base":
        if not (work / BASE_FILE).exists():
            session = Session(work, plan, method)
            base = session.measure_base()
            (work / BASE_FILE).write_text(json.dumps(base))
        return

    def run_missing(pairs: list[tuple[float, int]]) -> None:
        nonlocal session
        for lr, seed in pairs:
            done = {(r["learning_rate"], r["seed"]) for r in read_runs(work, name)}
            if (lr, seed) in done:
                continue
            session = session or Session(work, plan, method)
            print(f"[{name}] lr {lr:g}, seed {seed}", flush=True)
            run = session.train(lr, seed)
            append_run(work, run)
            print(f"[{name}] {asdict(run)}", flush=True)

    # The sweep on the first seed, then the other seeds at the rate with the best Uni.
    run_missing([(lr, seeds[0]) for lr in method.learning_rates])
    best = best_learning_rate(work, name)
    run_missing([(best, seed) for seed in seeds[1:]])


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
