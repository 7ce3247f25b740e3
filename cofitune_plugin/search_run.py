"""`axolotl cofitune-search` in this process: the recipe's checks, the trials (each a run of the
training session, scored by the report's own evaluator), and the files the search writes
(trials.jsonl, chosen.yml, report.md, pareto.png)."""

import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cofitune_plugin.args import ADAPTER, RecipeError, check_recipe, check_search_recipe
from cofitune_plugin.datafiles import check_data_files
from cofitune_plugin.plugin import LOG, meta_model_of
from cofitune_plugin.report import markdown_table, pareto_plot, versus_paper_default
from cofitune_plugin.search import (
    BaseRecord,
    Candidate,
    SearchError,
    SearchRecords,
    TrialRecord,
    check_levels,
    paper_default,
    run_search,
    write_chosen,
)
from cofitune_plugin.selection import select

# Keys that decide where things go or how they are logged, not what a trial measures.
_NOT_IN_HEADER = ("output_dir", "dataset_prepared_path", "logging_steps", "save_strategy")


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
    records = SearchRecords(Path(output))
    records.check_header(search_header(raw))
    trials = SearchTrials(config, spec, records, planned)
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
        f"({100 * (1 - trained / seconds):.0f}% outside training: loading "
        f"{trials.load_seconds:.1f} s, evaluation "
        f"{sum(t.eval_seconds for t in trials.finished):.1f} s).\n"
        f"All trials: training {sum(t.train_seconds for t in result.visited):.1f} s, evaluation "
        f"{sum(t.eval_seconds for t in result.visited):.1f} s.\n"
        f"Chosen: layers {result.chosen.window} ({text_config.num_hidden_layers} in the model), "
        f"modules {result.chosen.modules}, written to {chosen_path}.\n"
        f"{versus_paper_default(result, paper)}"
    )
    table = markdown_table(result, records.base(), spec.speciality.metric, total, paper)
    (directory / "report.md").write_text(f"# CoFiTune search: {config}\n\n{table}\n\n{summary}\n")
    return f"{table}\n\n{summary}"


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
        from cofitune_plugin.eval_schema import EvalSettings
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
        settings = EvalSettings(
            speciality=self.spec.speciality,
            versatility=self.spec.versatility,
            eval_batch_size=self.spec.eval_batch_size,
        )
        self.evaluator = Evaluator(self.session.tokenizer, settings)
        self.load_seconds += time.perf_counter() - start

    def base(self) -> BaseRecord:
        from cofitune_plugin.importance_store import model_fingerprint

        recorded = self.records.base()
        if recorded is not None:
            return recorded
        if self.session is None:  # only possible with no trial run yet: load for the first level
            raise RuntimeError("cofitune-search: the base model is measured after loading")
        start = time.perf_counter()
        model = self.session.model
        answers = self.evaluator.base_answers(model)
        scores = self.evaluator.evaluate(model, answers)
        base = BaseRecord(
            speciality=scores.speciality,
            retention_nll=scores.retention_nll,
            tasks=scores.task_scores(),
            seconds=time.perf_counter() - start,
            fingerprint=model_fingerprint(model),
            answers=answers,
        )
        self.records.save_base(base)
        LOG.info(
            "cofitune: base model: speciality %.4f, retention NLL %.4f",
            base.speciality,
            base.retention_nll,
        )
        return base

    def run(self, candidate: Candidate) -> TrialRecord:
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
        record = TrialRecord(
            key=candidate.key,
            window=candidate.window,
            modules=candidate.modules,
            layers=list(candidate.layers),
            trainable=candidate.trainable,
            speciality=scores.speciality,
            retention_nll=scores.retention_nll,
            agreement=scores.agreement,
            tasks=scores.task_scores(),
            train_seconds=run.train_seconds,
            eval_seconds=eval_seconds,
        )
        self.records.append(record)
        self.finished.append(record)
        return record


def search_header(raw: dict) -> dict:
    """What trial records depend on: the recipe without the search's own shape (its levels and
    cap may change between runs; records are matched per candidate) or its `weights` (they
    only score the records: new weights re-score them without training again)."""
    from cofitune_plugin import __version__

    recipe = {k: v for k, v in raw.items() if k not in _NOT_IN_HEADER}
    block = {
        k: v
        for k, v in raw["cofitune"].items()
        if k not in ("layers", "modules", "soft_mask", "from_search")
    }
    block["search"] = {
        k: v
        for k, v in block["search"].items()
        if k not in ("levels", "max_trials", "output_dir", "weights")
    }
    return {"recipe": {**recipe, "cofitune": block}, "plugin_version": __version__}
