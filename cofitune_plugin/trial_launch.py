"""Search trials as launches: each trial of `axolotl cofitune-search` is its own `accelerate
launch` of Axolotl's training (`-m axolotl.cli.train CONFIG`, as `axolotl train --sweep` runs
each of its configs), under the recipe's launcher (DeepSpeed ZeRO-2/3, FSDP2, DDP) and with the
trial's selection.

The search's own process (the driver) keeps the records. Per trial it writes a config,
`trials/<trial>/config.yml` (the recipe with `cofitune.search.trial` applied, the candidate's
`layers`/`modules`, no soft mask), launches it, then scores the saved model in one more process
of its own (`python -m cofitune_plugin.trial_launch TRIAL_DIR`, on the trial's first device:
after a launch the trainer's process holds state, such as Axolotl's ZeRO-3 loading patches,
that would partition the model being scored), with both outputs in `trials/<trial>/trial.log`.
The scorer writes `scores.json` (fsynced, then renamed into place); the driver turns it into the
record it appends to trials.jsonl and deletes the trial's weights. A trial that ends without
scores (a crash, an out-of-memory error, a killed rank) is recorded as failed with its exit
status and log tail.

Where trials run is the executor's: `LocalGroups`, the visible GPUs split into groups of
`gpus_per_trial` (without a GPU, `cpu_trials_at_once` groups of `cpu_processes_per_trial`
processes), one trial per group at once, level by level; or `ray_trials.RayTrials`, a Ray
cluster's placement groups. Both run the same `run_trial`. Records are appended in candidate
order, whatever order the trials end in and wherever they ran, so the records do not depend on
how many trials ran at once, nor where.

A killed driver loses no finished trial: a trial's scores file exists before the driver reads
it, and a restarted driver collects it instead of launching again. Each trial's processes
inherit a lock on its log, so a restarted driver that finds a trial of the killed one still
running waits for it rather than start it a second time.
"""

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any, Protocol

import torch
import yaml

from cofitune_plugin.args import LAUNCHER_KEYS, CoFiTuneConfig, SearchConfig
from cofitune_plugin.cpu_threads import THREADS_VARIABLE, usable_cores
from cofitune_plugin.eval_schema import RecipeError
from cofitune_plugin.search import Candidate, SearchRecords, TrialRecord

TRIALS_DIR = "trials"
CONFIG_FILE = "config.yml"
LOG_FILE = "trial.log"
SCORES_FILE = "scores.json"
LOG_TAIL = 3000
"""Characters of a failed trial's log kept in its record."""
LOG = logging.getLogger("axolotl.integrations.cofitune")
"""plugin.LOG's logger (Axolotl shows INFO from loggers under "axolotl"), without importing
Axolotl: Ray workers and the scorer run this module."""


@dataclass(frozen=True)
class DeviceGroup:
    """What one trial runs on: GPU indices (its CUDA_VISIBLE_DEVICES; none on a CPU) and its
    process count."""

    gpus: tuple[str, ...]
    processes: int


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [name.strip() for name in listed.split(",") if name.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def device_groups(spec: SearchConfig, gpus: list[str]) -> list[DeviceGroup]:
    """The groups trials run on at once: `gpus` in groups of `gpus_per_trial` (GPUs left over
    stay idle), or without GPUs `cpu_trials_at_once` groups of `cpu_processes_per_trial`."""
    if not gpus:
        return [DeviceGroup((), spec.cpu_processes_per_trial)] * spec.cpu_trials_at_once
    size = spec.gpus_per_trial or len(gpus)
    if size > len(gpus):
        raise RecipeError(
            f"cofitune.search.gpus_per_trial: {size}, but {len(gpus)} GPU(s) are visible; set "
            f"it to at most {len(gpus)} (or unset: every visible GPU)"
        )
    return [
        DeviceGroup(tuple(gpus[start : start + size]), size)
        for start in range(0, len(gpus) - size + 1, size)
    ]


def trial_mode(raw: dict, spec: SearchConfig, groups: list[DeviceGroup]) -> tuple[bool, str]:
    """Whether trials are launched (else they run in this process), and why."""
    engines = [key for key in LAUNCHER_KEYS if raw.get(key)]
    single = len(groups) == 1 and groups[0].processes == 1
    if spec.trials == "in_process":
        if engines or not single:
            raise RecipeError(
                "cofitune.search.trials: in_process runs one trial at a time on one process "
                f"without a launcher, but the recipe has {engines or 'several processes'}; set "
                "`trials: launch` (or auto)"
            )
        return False, "cofitune.search.trials: in_process"
    if spec.backend == "ray":
        return True, "cofitune.search.backend: ray: each trial a launch on a Ray placement group"
    if spec.trials == "launch":
        return True, "cofitune.search.trials: launch"
    if engines:
        return True, f"auto: the recipe's `{engines[0]}` launcher needs a launch per trial"
    if not single:
        return True, (
            f"auto: {len(groups)} group(s) of {groups[0].processes} process(es), one trial each"
        )
    return False, "auto: one process per trial, one trial at a time: model and data load once"


def trial_name(candidate: Candidate) -> str:
    """The candidate's directory name under trials/ (from its key: the same on every start)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", candidate.key)


def trial_config(raw: dict, spec: SearchConfig, candidate: Candidate, trial_dir: Path) -> dict:
    """The recipe one launched trial trains: `cofitune.search.trial` applied, the candidate's
    selection without soft masks (the search compares selections), weights saved only at the
    end (for scoring), and the search's directory (where the scorer finds the base record)."""
    block = {k: v for k, v in raw["cofitune"].items() if k not in ("soft_mask", "from_search")}
    search_dir = Path(spec.output_dir or raw["cofitune"]["from_search"]).resolve()
    block["search"] = {**block["search"], "output_dir": str(search_dir)}
    block.update(layers=candidate.window, modules=candidate.modules)
    return {
        **raw,
        **spec.trial,
        "cofitune": block,
        "output_dir": str((trial_dir / "out").resolve()),
        "save_strategy": "no",
    }


def launch_command(config: Path, group: DeviceGroup) -> list[str]:
    """`accelerate launch` of Axolotl's training, as `axolotl train` builds it."""
    several = ["--multi_gpu"] if group.processes > 1 else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(group.processes),
        *several,
        "--main_process_port",
        str(_free_port()),
        "-m",
        "axolotl.cli.train",
        str(config),
    ]


def _free_port() -> int:
    """A port for one launch's rendezvous, so trials running at once never meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TrialJob:
    """One launched trial as whatever runs it sees it (a thread of the driver, or a Ray worker
    on another node: plain data): its directory, the config it trains, and the directory its
    processes start in (the recipe's relative paths are relative to it)."""

    trial_dir: Path
    config: dict
    cwd: Path


def run_trial(job: TrialJob, group: DeviceGroup, threads: str) -> int | None:
    """Train and score one trial on `group`'s devices (`threads`: OMP_NUM_THREADS of each
    process on a CPU): its launch, then its scorer, both writing to its log, which it holds
    locked throughout, so a restarted driver waits on a trial of the killed one still running
    instead of starting it twice. The exit status of the last process run, or None where the
    scores of an earlier start were found instead."""
    job.trial_dir.mkdir(parents=True, exist_ok=True)
    log_path = job.trial_dir / LOG_FILE
    with log_path.open("a") as log:
        try:
            fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info(
                "cofitune-search: %s is still running from an earlier start; waiting", log_path
            )
            fcntl.flock(log, fcntl.LOCK_EX)
        if (job.trial_dir / SCORES_FILE).is_file():
            return None
        config = job.trial_dir / CONFIG_FILE
        config.write_text(yaml.safe_dump(job.config, sort_keys=False))
        devices = f"GPUs {','.join(group.gpus)}" if group.gpus else "CPU"
        where = f"{socket.gethostname()}, {devices}, {group.processes} process(es)"
        LOG.info("cofitune-search: %s on %s", job.trial_dir.name, where)
        log.write(f"\n# {where}\n")
        environment = trial_environment(group, threads)
        start = time.perf_counter()
        status = _call(launch_command(config, group), log, environment, job.cwd)
        if status == 0:
            seconds = time.perf_counter() - start
            score = [sys.executable, "-m", __name__, str(job.trial_dir), f"{seconds:.3f}"]
            status = _call(score, log, environment, job.cwd)
    return status


def _call(command: list[str], log, environment: dict[str, str], cwd: Path) -> int:
    """Run `command` with its output in `log`; its exit status."""
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    return subprocess.run(
        command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=cwd, check=False
    ).returncode


def trial_environment(group: DeviceGroup, threads: str) -> dict[str, str]:
    """A trial's environment: this process's, with the group's GPUs, or on a CPU `threads`."""
    environment = dict(os.environ)
    if group.gpus:
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(group.gpus)
    else:
        environment[THREADS_VARIABLE] = threads
    return environment


def threads_per_process(exported: str | None, cores: int, processes: int) -> str:
    """OMP_NUM_THREADS of each CPU process of a trial: the one the user exported to the search,
    which the plugin keeps as it keeps any, else an equal share of `cores` among the
    `processes` that share them."""
    return exported or str(max(1, cores // processes))


class TrialExecutor(Protocol):
    """Where launched trials run: this machine's device groups (`LocalGroups`) or a Ray
    cluster (`ray_trials.RayTrials`)."""

    groups: list[DeviceGroup]
    """The groups trials run on at once (for Ray, the shape of one: Ray picks its GPUs)."""
    on_gpu: bool

    def start(self, jobs: list[TrialJob]) -> Iterator[int | None]:
        """Start `jobs`; `run_trial`'s result for each, in their order."""
        ...


class LocalGroups:
    """This machine's device groups, one trial per group at once."""

    def __init__(self, groups: list[DeviceGroup]) -> None:
        self.groups = groups
        self.on_gpu = bool(groups[0].gpus)

    def start(self, jobs: list[TrialJob]) -> Iterator[int | None]:
        free: Queue[DeviceGroup] = Queue()
        for group in self.groups:
            free.put(group)
        processes = sum(g.processes for g in self.groups)
        threads = threads_per_process(os.environ.get(THREADS_VARIABLE), usable_cores(), processes)

        def on_a_free_group(job: TrialJob) -> int | None:
            group = free.get()
            try:
                return run_trial(job, group, threads)
            finally:
                free.put(group)

        pool = ThreadPoolExecutor(len(self.groups))
        futures = [pool.submit(on_a_free_group, job) for job in jobs]
        pool.shutdown(wait=False)  # the queued trials still run
        return (future.result() for future in futures)


class LaunchedTrials:
    """Runs a level's trials as launches on `executor` (see the module docstring); the records
    it returns are appended in the order of the candidates given, by this process alone."""

    def __init__(
        self, raw: dict, spec: SearchConfig, records: SearchRecords, executor: TrialExecutor
    ) -> None:
        self.raw, self.spec, self.records, self.executor = raw, spec, records, executor
        self.finished: list[TrialRecord] = []

    def run(self, candidates: list[Candidate]) -> list[TrialRecord]:
        jobs: dict[str, TrialJob] = {}
        for candidate in candidates:  # scores an earlier driver's trial left need no launch
            trial_dir = self._directory(candidate)
            if not (trial_dir / SCORES_FILE).is_file():
                jobs[candidate.key] = self._job(candidate, trial_dir)
        statuses = self.executor.start(list(jobs.values()))
        done = []
        for candidate in candidates:  # candidate order, whatever order they end in
            status = next(statuses) if candidate.key in jobs else None
            record = self._record(candidate, status)
            self.records.append(record)
            done.append(record)
        return done

    def _directory(self, candidate: Candidate) -> Path:
        return self.records.directory.resolve() / TRIALS_DIR / trial_name(candidate)

    def _job(self, candidate: Candidate, trial_dir: Path) -> TrialJob:
        LOG.info(
            "cofitune-search: trial %s: layers %s, modules %s (%s parameters); log %s",
            trial_name(candidate),
            candidate.window,
            candidate.modules,
            f"{candidate.trainable:,}",
            trial_dir / LOG_FILE,
        )
        config = trial_config(self.raw, self.spec, candidate, trial_dir)
        return TrialJob(trial_dir, config, Path.cwd())

    def _record(self, candidate: Candidate, status: int | None) -> TrialRecord:
        """The trial's record from its scores file, or its failure (`status`: its exit
        status; None where an earlier start's scores were found)."""
        trial_dir = self._directory(candidate)
        path = trial_dir / SCORES_FILE
        if path.is_file():
            record = TrialRecord.of(candidate, **json.loads(path.read_text()))
            shutil.rmtree(trial_dir / "out", ignore_errors=True)  # scored: the weights go
            if status is None:
                LOG.info(
                    "cofitune-search: %s: scores found in %s, not run again",
                    candidate.key,
                    trial_dir,
                )
            else:
                self.finished.append(record)
            return record
        log_path = trial_dir / LOG_FILE
        tail = log_path.read_text(errors="replace")[-LOG_TAIL:] if log_path.is_file() else ""
        LOG.warning(
            "cofitune-search: trial %s failed (exit status %s); see %s",
            candidate.key,
            status,
            log_path,
        )
        return TrialRecord.failure(
            candidate, f"exit status {status}, no scores; {log_path} ends:\n{tail}"
        )


def load_scored_model(path: str | Path, trust_remote_code: bool = False):
    """A model as the search scores it outside training: read from `path` in its saved dtype,
    spread over the visible GPUs where there are any (a 70B model holds no single GPU; in a
    trial's scorer they are its group's), else on the CPU."""
    from transformers import AutoModelForCausalLM

    on_gpus = {"device_map": "auto"} if torch.cuda.is_available() else {}
    return AutoModelForCausalLM.from_pretrained(
        path, dtype="auto", trust_remote_code=trust_remote_code, **on_gpus
    )


def score_trial(trial_dir: Path, launch_seconds: float) -> Path:
    """Score a launched trial's saved model on the search's data, against the base record's
    answers, and write its scores file (`launch_seconds`: the launch's wall time, kept as the
    trial's training time: start-up, loading and saving included)."""
    from transformers import AutoTokenizer

    from cofitune_plugin.scoring import Evaluator

    raw = yaml.safe_load((trial_dir / CONFIG_FILE).read_text())
    search = CoFiTuneConfig.model_validate(raw["cofitune"]).search
    base = SearchRecords(Path(search.output_dir)).base()
    output_dir, remote = raw["output_dir"], bool(raw.get("trust_remote_code"))
    # the tokenizer as Axolotl set it up, saved beside the model
    tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=remote)
    evaluator = Evaluator(tokenizer, search.eval_settings())
    model = load_scored_model(output_dir, remote)
    start = time.perf_counter()
    scores = evaluator.evaluate(model, base.answers)
    measures: dict[str, Any] = {
        **scores.trial_measures(),
        "train_seconds": launch_seconds,
        "eval_seconds": time.perf_counter() - start,
    }
    path = trial_dir / SCORES_FILE
    partial = path.with_suffix(".partial")
    with partial.open("w") as f:
        f.write(json.dumps(measures))
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
    return path


if __name__ == "__main__":
    score_trial(Path(sys.argv[1]), float(sys.argv[2]))
