"""The coarse level's tree search: which layer window x module set to train.

A level proposes candidates (windows x module sets); each candidate is trained briefly and scored;
the level's best becomes the next level's starting point, and the last level's best is the chosen
selection. Unlike the paper's tree, which always narrows, a narrower window must score above the
window it came from (a split level keeps its parent, and the default module level includes the
parent's `ffn+mha`): at a small learning rate a wide selection can keep more than a narrow one,
which needs a higher rate to learn as much (README "Evidence"). The report shows every trial.
Scores are Uni = w_s Spec + w_v Vers, each axis a ratio to a reference (docs/design.md section
5): Spec to the best trial seen so far, Vers to the base model. The tree is replayed from the
records on every start, so a search resumed after a crash takes exactly the path the
uninterrupted one would have.

Pure Python: the caller supplies `resolve` (spec -> trained layers and parameter count) and
`run_trial` (candidate -> measured record), so the search logic is testable without a model.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from cofitune_plugin.args import SPLIT, CoFiTuneConfig, SearchLevel, SearchWeights
from cofitune_plugin.jsonl import RecordError, append_record, read_records
from cofitune_plugin.selection import DEPTH_WINDOW, compact_layers

TRIALS_FILE = "trials.jsonl"
HEADER_FILE = "search.json"
BASE_FILE = "base.json"
CHOSEN_FILE = "chosen.yml"
HOST_PACKAGES = ("axolotl", "transformers", "peft")
"""The packages a trial's numbers depend on across the supported Axolotl range (0.21 seeds LoRA
and changes checkpointing defaults; each Axolotl pins its transformers and peft)."""

Window = str | int | list[int]


class SearchError(ValueError):
    """A search that cannot run as written, or records that do not belong to this recipe."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a window (as written or derived) and a module set."""

    window: str
    modules: str
    layers: tuple[int, ...]
    trainable: int

    @property
    def key(self) -> str:
        """Identity across windows written differently ('25%-50%' and '7-14' are one trial)."""
        return f"layers={compact_layers(self.layers)}|modules={self.modules}"


@dataclass
class TrialRecord:
    """What one finished trial measured; one JSON line in `trials.jsonl`."""

    key: str
    window: str
    modules: str
    layers: list[int]
    trainable: int
    speciality: float
    retention_nll: float
    agreement: float
    train_seconds: float
    eval_seconds: float
    tasks: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # HOST_PACKAGES' when measured
    # Why the trial produced no scores (exit status and its log's tail); its measures are 0 and
    # it is never scored. Kept, not run again: delete its line to retry it.
    failed: str | None = None

    @classmethod
    def of(cls, candidate: Candidate, **measures: Any) -> "TrialRecord":
        """The record of `candidate` with what its trial measured (or `failed`), under this
        environment's host versions unless `measures` names them."""
        measures.setdefault("versions", host_versions())
        return cls(
            key=candidate.key,
            window=candidate.window,
            modules=candidate.modules,
            layers=list(candidate.layers),
            trainable=candidate.trainable,
            **measures,
        )

    @classmethod
    def failure(cls, candidate: Candidate, why: str) -> "TrialRecord":
        zero = dict.fromkeys(("speciality", "retention_nll", "agreement"), 0.0)
        return cls.of(candidate, **zero, train_seconds=0.0, eval_seconds=0.0, failed=why)


def host_versions() -> dict[str, str]:
    """The installed versions of HOST_PACKAGES, as trial records keep them."""
    return {name: version(name) for name in HOST_PACKAGES}


@dataclass
class BaseRecord:
    """The untrained model, measured once per search: its scores, the greedy answers trials
    are scored against, and its weight fingerprint (new trials refuse other weights)."""

    speciality: float
    retention_nll: float
    seconds: float
    fingerprint: str
    answers: list[list[int]]
    tasks: dict[str, float] = field(default_factory=dict)


@dataclass
class Score:
    speciality: float
    versatility: float
    uni: float


@dataclass
class SearchResult:
    visited: list[TrialRecord]  # the trials that produced scores
    scores: dict[str, Score]
    chosen: TrialRecord
    capped: bool = False
    failed: list[TrialRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was not started


def window_label(window: Window) -> str:
    if isinstance(window, str):
        return window.replace(" ", "")
    return compact_layers([window] if isinstance(window, int) else window)


def modules_label(modules: str | list[str]) -> str:
    return modules.replace(" ", "") if isinstance(modules, str) else "+".join(modules)


def split_window(window: str, layers: tuple[int, ...]) -> list[str]:
    """Halve a window: a depth window at its midpoint ('0%-50%' -> '0%-25%', '25%-50%'),
    anything else by its layer list."""
    if match := DEPTH_WINDOW.match(window):
        lo, hi = float(match[1]), float(match[2])
        mid = (lo + hi) / 2
        return [f"{lo:g}%-{mid:g}%", f"{mid:g}%-{hi:g}%"]
    if len(layers) < 2:
        raise SearchError(f"cofitune.search: cannot split window {window!r}: it has one layer")
    half = len(layers) // 2
    return [window_label(list(layers[:half])), window_label(list(layers[half:]))]


Resolve = Callable[[str, str], Candidate]


def level_candidates(level: SearchLevel, winner: Candidate | None, resolve: Resolve) -> list:
    """The candidates of one level, given the previous level's winner. A split level keeps the
    winner's window among its candidates (already measured, so not trained again): a half wins
    only where it scores above the whole."""
    if winner is None and (level.windows in (None, SPLIT) or level.modules is None):
        raise SearchError("cofitune.search: the first level needs both `windows` and `modules`")
    if level.windows is None:
        windows = [winner.window]
    elif level.windows == SPLIT:
        windows = [winner.window, *split_window(winner.window, winner.layers)]
    else:
        windows = [window_label(w) for w in level.windows]
    modules = [modules_label(m) for m in level.modules] if level.modules else [winner.modules]
    return [resolve(w, m) for w in windows for m in modules]


def paper_selection() -> tuple[str, str]:
    """(window, modules) of the paper's selection: what `cofitune: {}` trains."""
    default = CoFiTuneConfig()
    return window_label(default.layers), modules_label(default.modules)


def paper_default(resolve: Resolve) -> Candidate | None:
    """The paper's selection on this model, so the report can show what the search bought over
    it; None where it does not resolve (e.g. a model too shallow for its window)."""
    try:
        return resolve(*paper_selection())
    except ValueError:
        return None


def check_levels(levels: list[SearchLevel], resolve: Resolve) -> int:
    """Resolve every candidate any path through the tree can reach, so that a bad window or
    module name fails before the first trial trains; returns the most trials one path runs (a
    level's candidates other than the winner it starts from, which is already measured)."""
    winners: list[Candidate | None] = [None]
    most = 0
    for i, level in enumerate(levels, start=1):
        found: dict[str, Candidate] = {}
        widest = 0
        for winner in winners:
            try:
                candidates = level_candidates(level, winner, resolve)
            except ValueError as exc:
                raise SearchError(f"cofitune.search.levels[{i}]: {exc}") from None
            found.update({c.key: c for c in candidates})
            widest = max(widest, sum(winner is None or c.key != winner.key for c in candidates))
        most += widest
        winners = list(found.values())
    return most


def score_trials(
    trials: list[TrialRecord],
    base: BaseRecord,
    metric: str,
    weights: SearchWeights,
) -> dict[str, Score]:
    """Uni for each trial, normalised over exactly these trials (and the base). Vers is the mean
    of the retention ratio (base NLL / trial NLL) and each lm-eval task's trial / base score."""
    if metric == "loss":
        best = min(t.speciality for t in trials)
        spec = {t.key: best / t.speciality if t.speciality > 0 else 1.0 for t in trials}
    else:
        best = max(t.speciality for t in trials)
        spec = {t.key: t.speciality / best if best > 0 else 0.0 for t in trials}
    scores = {}
    for t in trials:
        ratios = [base.retention_nll / t.retention_nll if t.retention_nll > 0 else 1.0]
        ratios += [t.tasks[name] / score for name, score in base.tasks.items() if score > 0]
        vers = sum(ratios) / len(ratios)
        uni = weights.speciality * spec[t.key] + weights.versatility * vers
        scores[t.key] = Score(speciality=spec[t.key], versatility=vers, uni=uni)
    return scores


def _best(trials: list[TrialRecord], scores: dict[str, Score]) -> TrialRecord:
    # Ties go to the smaller selection: the same score for less forgetting risk and compute.
    return max(trials, key=lambda t: (scores[t.key].uni, -t.trainable))


def run_search(
    levels: list[SearchLevel],
    resolve: Resolve,
    run_trials: Callable[[list[Candidate]], list[TrialRecord]],
    records: dict[str, TrialRecord],
    base: Callable[[], BaseRecord],
    metric: str,
    weights: SearchWeights,
    max_trials: int | None = None,
    refuse: Callable[[Candidate], str | None] = lambda candidate: None,
) -> SearchResult:
    """Walk the tree, reusing `records` and handing each level's unseen candidates to
    `run_trials` at once (which may run them side by side; it returns their records in the
    order given). `refuse` names why a candidate may not start (it would not fit in memory):
    such a candidate is skipped, as is a failed trial when the level's winner is chosen.

    Each level's winner is judged with the scores normalised over the trials visited up to
    that level, which depends only on the records, so a resumed search takes the same path,
    however many trials ran at once.
    """
    visited: dict[str, TrialRecord] = {}
    skipped: dict[str, str] = {}
    winner: Candidate | None = None
    chosen: TrialRecord | None = None
    capped = False
    for level in levels:
        reached: list[Candidate] = []
        for candidate in level_candidates(level, winner, resolve):
            if candidate.key in skipped:
                continue
            if candidate.key not in visited and candidate.key not in (c.key for c in reached):
                if (why := refuse(candidate)) is not None:
                    skipped[candidate.key] = why
                    continue
                new = sum(c.key not in visited for c in reached)
                if max_trials is not None and len(visited) + new >= max_trials:
                    capped = True
                    break
            reached.append(candidate)
        unseen = [c for c in reached if c.key not in visited and c.key not in records]
        ran = {c.key: t for c, t in zip(unseen, run_trials(unseen) if unseen else [])}
        for candidate in reached:
            if candidate.key not in visited:
                visited[candidate.key] = records.get(candidate.key) or ran[candidate.key]
        level_trials = [(c, visited[c.key]) for c in reached if not visited[c.key].failed]
        if not level_trials:
            break
        scores = score_trials(_scored(visited), base(), metric, weights)
        chosen = _best([t for _, t in level_trials], scores)
        winner = next(c for c, t in level_trials if t is chosen)
        if capped:
            break
    if chosen is None:
        failed = [t.key for t in visited.values() if t.failed]
        raise SearchError(
            "cofitune.search: no trial of the first level produced scores ("
            + (f"failed: {failed}; " if failed else "")
            + (f"skipped: {skipped}" if skipped else "")
            + "); see the trials' logs in the search's output_dir"
        )
    trials = _scored(visited)
    return SearchResult(
        trials,
        score_trials(trials, base(), metric, weights),
        chosen,
        capped,
        failed=[t for t in visited.values() if t.failed],
        skipped=skipped,
    )


def _scored(visited: dict[str, TrialRecord]) -> list[TrialRecord]:
    return [t for t in visited.values() if not t.failed]


class SearchRecords:
    """The search directory: a header naming what the records were measured under, the base
    model's scores, and one appended JSON line per finished trial (fsynced, so a crash loses at
    most the trial in progress)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.trials_path = self.directory / TRIALS_FILE

    def check_header(self, header: dict[str, Any]) -> None:
        """Write `header` on first use; afterwards refuse records made under another one."""
        path = self.directory / HEADER_FILE
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(header, indent=2, sort_keys=True))
            return
        recorded = json.loads(path.read_text())
        changed = [
            f"{key}: {old!r} -> {new!r}"
            for key, old, new in _diff(_flatten(recorded), _flatten(header))
        ]
        if changed:
            raise SearchError(
                f"{self.directory} holds trials measured under another recipe ("
                + "; ".join(changed[:6])
                + "). Point `cofitune.search.output_dir` at a new directory, or move that one "
                "away to start over; its records are left untouched."
            )

    def check_versions(self, current: dict[str, str]) -> None:
        """Refuse to add trials measured under `current` versions to trials measured under
        others: their scores are not comparable (the search ranks them against each other)."""
        for record in self.trials().values():
            if record.versions != current:
                recorded = _versions_label(record.versions) or "versions not recorded"
                raise SearchError(
                    f"{self.trials_path}: trial {record.key} was measured under {recorded}, "
                    f"this environment has {_versions_label(current)}; trials measured under "
                    "different versions do not compare. Point `cofitune.search.output_dir` at a "
                    "new directory (or move this one away) to search again here, or run the "
                    "search in the environment that made these records."
                )

    def trials(self) -> dict[str, TrialRecord]:
        try:
            records = read_records(self.trials_path, lambda row: TrialRecord(**row))
        except RecordError as exc:
            raise SearchError(str(exc)) from None
        return {record.key: record for record in records}

    def append(self, record: TrialRecord) -> None:
        append_record(self.trials_path, asdict(record))

    def base(self) -> BaseRecord | None:
        path = self.directory / BASE_FILE
        return BaseRecord(**json.loads(path.read_text())) if path.exists() else None

    def save_base(self, base: BaseRecord) -> None:
        _write_atomic(self.directory / BASE_FILE, json.dumps(asdict(base), indent=2))


def write_chosen(directory: Path, result: SearchResult) -> Path:
    """The chosen selection, as the `layers`/`modules` that `cofitune.from_search` reads."""
    chosen, score = result.chosen, result.scores[result.chosen.key]
    text = (
        f"# Chosen by `axolotl cofitune-search`: the last level's best of {len(result.visited)} "
        f"trials, Uni {score.uni:.3f} (Spec {score.speciality:.3f}, Vers "
        f"{score.versatility:.3f}); see report.md.\n"
        f"# Layers {compact_layers(chosen.layers)}, {chosen.trainable:,} trainable parameters.\n"
        + yaml.safe_dump({"layers": chosen.window, "modules": chosen.modules}, sort_keys=False)
    )
    path = Path(directory) / CHOSEN_FILE
    _write_atomic(path, text)
    return path


def read_chosen(directory: Path) -> dict[str, str]:
    path = Path(directory) / CHOSEN_FILE
    if not path.is_file():
        raise SearchError(
            f"cofitune.from_search: no chosen selection in {directory}; run `axolotl "
            "cofitune-search <recipe.yml>` first, or set `layers`/`modules` instead"
        )
    chosen = yaml.safe_load(path.read_text())
    return {"layers": chosen["layers"], "modules": chosen["modules"]}


def _versions_label(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {number}" for name, number in sorted(versions.items()))


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _diff(old: Iterator, new: Iterator) -> Iterator[tuple[str, Any, Any]]:
    before, after = dict(old), dict(new)
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            yield key, before.get(key), after.get(key)
