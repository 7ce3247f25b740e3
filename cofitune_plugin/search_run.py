"""`axolotl cofitune-search`: the recipe's checks (the memory of every first-level candidate
among them, before anything loads), the trials (in this process, each a run of the training
session scored by the report's own evaluator, or each its own launch: trial_launch.py), and the
files the search writes (trials.jsonl, chosen.yml, report.md, pareto.png)."""

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from cofitune_plugin.args import (
    ADAPTER,
    LAUNCHER_KEYS,
    RecipeError,
    check_recipe,
    check_search_recipe,
)
from cofitune_plugin.datafiles import check_data_files
from cofitune_plugin.memory_plan import GIB, model_shape, plan_memory, recipe_setup
from cofitune_plugin.plugin import LOG, meta_model_of
from cofitune_plugin.report import markdown_table, pareto_plot, versus_paper_default
from cofitune_plugin.search import (
    BaseRecord,
    Candidate,
    SearchError,
    SearchRecords,
    TrialRecord,
    check_levels,
    host_versions,
    level_candidates,
    paper_default,
    run_search,
    write_chosen,
)
from cofitune_plugin.selection import select
from cofitune_plugin.trial_launch import (
    LaunchedTrials,
    LocalGroups,
    TrialExecutor,
    device_groups,
    load_scored_model,
    trial_mode,
    visible_gpus,
)

# Keys that decide where things go or how they are logged, not what a trial measures.
_NOT_IN_HEADER = ("output_dir", "dataset_prepared_path", "logging_steps", "save_strategy")
# Search keys records do not depend on: the tree's shape (records are matched per candidate),
# the weights (they only score records) and where or on how many devices trials run.
_SEARCH_NOT_IN_HEADER = (
    "levels",
    "max_trials",
    "output_dir",
    "weights",
    "trials",
    "gpus_per_trial",
    "cpu_processes_per_trial",
    "cpu_trials_at_once",
    "device_memory_gib",
    "backend",
    "ray_address",
)


def search_command(config: str) -> str:
    """Run CONFIG's search (resuming from its records), write its files and return what the
    command prints."""
    start = time.perf_counter()
    raw = yaml.safe_load(Path(config).read_text())
    recipe = check_recipe(raw)
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
    check_search_recipe(spec)
    if "max_steps" not in spec.trial:
        LOG.warning(
            "cofitune-search: each trial trains the recipe's whole schedule; a short one is "
            "usually enough to rank candidates: set `cofitune.search.trial.max_steps`"
        )
    for warning in data_warnings:
        LOG.warning("cofitune-search: %s", warning)

    model_config, meta_model = meta_model_of(raw)
    text_config = model_config.get_text_config()

    def resolve(window: str, modules: str) -> Candidate:
        selection = select(meta_model, window, modules)
        return Candidate(window, modules, selection.layers, selection.numel)

    planned = min(check_levels(spec.levels, resolve), spec.max_trials or sys.maxsize)
    executor = trial_executor(spec, Path(output))
    launched, why = trial_mode(raw, spec, executor.groups)
    refuse = memory_refusal(raw, spec, meta_model, executor.groups[0].processes, executor.on_gpu)
    first = level_candidates(spec.levels[0], None, resolve)
    if all(refuse(c) for c in first):
        raise RecipeError(
            "cofitune.search: no candidate of the first level fits in memory, so no search can "
            "start: "
            + "; ".join(f"{c.window} x {c.modules}: {refuse(c)}" for c in first)
            + ". Use more GPUs per trial (`gpus_per_trial`), a sharding launcher, a smaller "
            "`micro_batch_size` in `trial`, or narrower windows"
        )
    records = SearchRecords(Path(output))
    records.check_header(search_header(raw))
    records.check_versions(host_versions())
    if launched:
        trials = LaunchedTrials(raw, spec, records, executor)
        base = records.base() or launched_base(config, spec, records)
    else:
        trials = SearchTrials(config, spec, records, planned)
    LOG.info("cofitune-search: trials %s (%s)", "launched" if launched else "in process", why)
    result = run_search(
        spec.levels,
        resolve,
        trials.run,
        records.trials(),
        base=(lambda: base) if launched else trials.base,
        metric=spec.speciality.metric,
        weights=spec.weights,
        max_trials=spec.max_trials,
        refuse=refuse,
    )

    directory = Path(output)
    chosen_path = write_chosen(directory, result)
    paper = paper_default(resolve)
    pareto_plot(result, directory / "pareto.png")
    total = sum(p.numel() for p in meta_model.parameters())
    seconds = time.perf_counter() - start
    trained = sum(t.train_seconds for t in trials.finished)
    loading = f"loading {trials.load_seconds:.1f} s, " if not launched else ""
    summary = (
        f"{len(result.visited)} trials ({len(trials.finished)} run now, the rest read from "
        f"{records.trials_path}){'; stopped at max_trials' if result.capped else ''}.\n"
        f"Trials {'launched, one Axolotl launch each' if launched else 'in this process'} "
        f"({why}).\n"
        f"This run: {seconds:.1f} s, of which trial training {trained:.1f} s "
        f"({100 * (1 - trained / seconds):.0f}% outside training: {loading}evaluation "
        f"{sum(t.eval_seconds for t in trials.finished):.1f} s).\n"
        f"All trials: training {sum(t.train_seconds for t in result.visited):.1f} s, evaluation "
        f"{sum(t.eval_seconds for t in result.visited):.1f} s.\n"
        + "".join(
            f"Failed (kept in trials.jsonl, not scored; delete its line to retry): {t.key}: "
            f"{t.failed.splitlines()[0]}\n"
            for t in result.failed
        )
        + "".join(
            f"Skipped before starting: {key}: {reason}\n" for key, reason in result.skipped.items()
        )
        + f"Chosen: layers {result.chosen.window} ({text_config.num_hidden_layers} in the model), "
        f"modules {result.chosen.modules}, written to {chosen_path}.\n"
        f"{versus_paper_default(result, paper)}"
    )
    table = markdown_table(result, records.base(), spec.speciality.metric, total, paper)
    (directory / "report.md").write_text(f"# CoFiTune search: {config}\n\n{table}\n\n{summary}\n")
    return f"{table}\n\n{summary}"


def trial_executor(spec, directory: Path) -> TrialExecutor:
    """Where launched trials would run: the Ray cluster (`backend: ray`, joined now), else this
    machine's device groups."""
    if spec.backend == "ray":
        from cofitune_plugin.ray_trials import RayTrials

        return RayTrials(spec, directory)
    return LocalGroups(device_groups(spec, visible_gpus()))


def memory_refusal(
    raw: dict, spec, meta_model, processes: int, on_gpu: bool
) -> Callable[[Candidate], str | None]:
    """Why a candidate may not start: its peak per device under the recipe's launcher on
    `processes` devices, as `axolotl cofitune-plan` estimates it (trials train without soft
    masks), over `device_memory_gib` (default: the smallest visible GPU's memory; no limit on
    a CPU, or where this process sees no GPU: a Ray driver on a CPU node)."""
    import torch

    limit = spec.device_memory_gib
    if limit is None and on_gpu and torch.cuda.is_available():
        sizes = range(torch.cuda.device_count())
        limit = min(torch.cuda.get_device_properties(i).total_memory for i in sizes) / GIB
    if limit is None:
        return lambda candidate: None
    block = {k: v for k, v in raw["cofitune"].items() if k != "soft_mask"}
    setup = replace(
        recipe_setup({**raw, **spec.trial, "cofitune": block}, processes), on_gpu=on_gpu
    )

    def refuse(candidate: Candidate) -> str | None:
        selection = select(meta_model, candidate.window, candidate.modules)
        peak = plan_memory(model_shape(meta_model, selection), setup).total / GIB
        if peak <= limit:
            return None
        return (
            f"estimated {peak:.3g} GiB per device ({setup.launcher} on {processes} "
            f"device(s)), over {limit:g} GiB"
        )

    return refuse


def measure_base(model, evaluator, records: SearchRecords) -> BaseRecord:
    """Score the untrained model, keep its greedy answers (what trials are scored against) and
    its fingerprint, and save them to the search's base.json."""
    from cofitune_plugin.importance_store import model_fingerprint

    start = time.perf_counter()
    answers = evaluator.base_answers(model)
    scores = evaluator.evaluate(model, answers)
    base = BaseRecord(
        speciality=scores.speciality,
        retention_nll=scores.retention_nll,
        tasks=scores.task_scores(),
        seconds=time.perf_counter() - start,
        fingerprint=model_fingerprint(model),
        answers=answers,
    )
    records.save_base(base)
    LOG.info(
        "cofitune: base model: speciality %.4f, retention NLL %.4f",
        base.speciality,
        base.retention_nll,
    )
    return base


def launched_base(config: str, spec, records: SearchRecords) -> BaseRecord:
    """The base record for launched trials, measured here before the first launch (each trial
    reads its answers): the model loaded as trials' models are for scoring, unsharded."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    from cofitune_plugin.scoring import Evaluator

    cfg = load_cfg(
        config,
        cofitune__soft_mask=None,
        cofitune__from_search=None,
        **dict.fromkeys(LAUNCHER_KEYS),
    )
    evaluator = Evaluator(load_tokenizer(cfg), spec.eval_settings())
    model = load_scored_model(cfg.base_model, bool(cfg.trust_remote_code))
    base = measure_base(model, evaluator, records)
    del model
    gc.collect()
    return base


class SearchTrials:
    """Runs trials in this process: the training session (base model and tokenized data) loads
    once, on the first trial that is not already recorded; each trial trains its selection
    (frozen around with Axolotl's own freezing) and is scored, then the base weights come back
    from a copy of the selection (only the selection ever changes)."""

    def __init__(self, config: str, spec, records: SearchRecords, planned: int) -> None:
        self.config, self.spec, self.records, self.planned = config, spec, records, planned
        self.finished: list[TrialRecord] = []
        self.load_seconds = 0.0
        self.session = None

    def _load(self, window: str, modules: str) -> None:
        from cofitune_plugin.scoring import Evaluator
        from cofitune_plugin.session import Session

        start = time.perf_counter()
        self.session = Session(
            self.config,
            cofitune__soft_mask=None,
            cofitune__from_search=None,
            cofitune__layers=window,
            cofitune__modules=modules,
            output_dir=str(self.records.directory / "trainer"),
            save_strategy="no",
            **self.spec.trial,
        )
        self.evaluator = Evaluator(self.session.tokenizer, self.spec.eval_settings())
        self.load_seconds += time.perf_counter() - start

    def base(self) -> BaseRecord:
        recorded = self.records.base()
        if recorded is not None:
            return recorded
        if self.session is None:  # only possible with no trial run yet: load for the first level
            raise RuntimeError("cofitune-search: the base model is measured after loading")
        return measure_base(self.session.model, self.evaluator, self.records)

    def run(self, candidates: list[Candidate]) -> list[TrialRecord]:
        return [self._run(candidate) for candidate in candidates]

    def _run(self, candidate: Candidate) -> TrialRecord:
        from axolotl.utils.dict import DictDefault

        from cofitune_plugin.importance_store import model_fingerprint

        if self.session is None:
            self._load(candidate.window, candidate.modules)
        session = self.session
        base = self.base()
        if base.fingerprint != model_fingerprint(session.model):
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
        unfrozen = session.select(candidate.window, candidate.modules).unfrozen_parameters()
        block = {**session.cfg.cofitune, "layers": candidate.window, "modules": candidate.modules}
        overrides = {"cofitune": DictDefault(block), "unfrozen_parameters": unfrozen}

        def evaluate(model) -> tuple[Any, float]:
            start = time.perf_counter()
            scores = self.evaluator.evaluate(model, base.answers)
            return scores, time.perf_counter() - start

        run = session.train(unfrozen, evaluate, overrides, plugin=True)
        scores, eval_seconds = run.evaluation
        record = TrialRecord.of(
            candidate,
            **scores.trial_measures(),
            train_seconds=run.train_seconds,
            eval_seconds=eval_seconds,
        )
        self.records.append(record)
        self.finished.append(record)
        return record


def search_header(raw: dict) -> dict:
    """What trial records depend on: the recipe without the search's own shape (its levels and
    cap may change between runs; records are matched per candidate), its `weights` (they
    only score the records: new weights re-score them without training again) or where and
    how many at once its trials run."""
    from cofitune_plugin import __version__

    recipe = {k: v for k, v in raw.items() if k not in _NOT_IN_HEADER}
    block = {
        k: v
        for k, v in raw["cofitune"].items()
        if k not in ("layers", "modules", "soft_mask", "from_search", "trial_scores")
    }
    block["search"] = {k: v for k, v in block["search"].items() if k not in _SEARCH_NOT_IN_HEADER}
    return {"recipe": {**recipe, "cofitune": block}, "plugin_version": __version__}
