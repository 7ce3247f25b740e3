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

Device groups: the visible GPUs split into groups of `gpus_per_trial` (without a GPU,
`cpu_trials_at_once` groups of `cpu_processes_per_trial` processes); one trial per group runs at
once, level by level. Records are appended in candidate order, whatever order the trials end
in, so the records do not depend on how many trials ran at once.

A killed driver loses no finished trial: a trial's scores file exists before the driver reads
it, and a restarted driver collects it instead of launching again. Each trial's processes
inherit a lock on its log, so a restarted driver that finds a trial of the killed one still
running waits for it rather than start it a second time.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

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


class LaunchedTrials:
    """Runs a level's trials as launches, one per device group at once (see the module
    docstring); the records it returns are appended in the order of the candidates given."""

    def __init__(
        self, raw: dict, spec: SearchConfig, records: SearchRecords, groups: list[DeviceGroup]
    ) -> None:
        self.raw, self.spec, self.records, self.groups = raw, spec, records, groups
        self.finished: list[TrialRecord] = []
        self.collected: list[TrialRecord] = []  # scores an earlier driver's trial left

    def run(self, candidates: list[Candidate]) -> list[TrialRecord]:
        free: Queue[DeviceGroup] = Queue()
        for group in self.groups:
            free.put(group)

        def on_a_free_group(candidate: Candidate) -> TrialRecord:
            group = free.get()
            try:
                return self._run(candidate, group)
            finally:
                free.put(group)

        with ThreadPoolExecutor(len(self.groups)) as pool:
            futures = [pool.submit(on_a_free_group, c) for c in candidates]
            done = []
            for future in futures:  # candidate order, whatever order they end in
                record = future.result()
                self.records.append(record)
                done.append(record)
        return done

    def _run(self, candidate: Candidate, group: DeviceGroup) -> TrialRecord:
        from cofitune_plugin.plugin import LOG  # Axolotl's logger; the scorer never needs it

        trial_dir = self.records.directory / TRIALS_DIR / trial_name(candidate)
        trial_dir.mkdir(parents=True, exist_ok=True)
        log_path = trial_dir / LOG_FILE
        with log_path.open("a") as log:
            try:
                fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                LOG.info(
                    "cofitune-search: %s is still running from an earlier start; waiting", log_path
                )
                fcntl.flock(log, fcntl.LOCK_EX)
            if (record := self._collect(candidate, trial_dir)) is not None:
                LOG.info(
                    "cofitune-search: %s: scores found in %s, not run again",
                    candidate.key,
                    trial_dir,
                )
                self.collected.append(record)
                return record
            config = trial_dir / CONFIG_FILE
            config.write_text(
                yaml.safe_dump(
                    trial_config(self.raw, self.spec, candidate, trial_dir), sort_keys=False
                )
            )
            devices = f"GPUs {','.join(group.gpus)}" if group.gpus else "CPU"
            LOG.info(
                "cofitune-search: trial %s: layers %s, modules %s (%s parameters) on %s, %d "
                "process(es); log %s",
                trial_name(candidate),
                candidate.window,
                candidate.modules,
                f"{candidate.trainable:,}",
                devices,
                group.processes,
                log_path,
            )
            start = time.perf_counter()
            status = self._call(launch_command(config, group), log, group)
            if status == 0:
                seconds = time.perf_counter() - start
                score = [sys.executable, "-m", __name__, str(trial_dir), f"{seconds:.3f}"]
                status = self._call(score, log, group)
        record = self._collect(candidate, trial_dir)
        if record is None:
            tail = log_path.read_text(errors="replace")[-LOG_TAIL:]
            record = TrialRecord.failure(
                candidate, f"exit status {status}, no scores; {log_path} ends:\n{tail}"
            )
            LOG.warning(
                "cofitune-search: trial %s failed (exit status %d); see %s",
                candidate.key,
                status,
                log_path,
            )
        else:
            shutil.rmtree(trial_dir / "out", ignore_errors=True)  # scored: the weights go
            self.finished.append(record)
        return record

    def _call(self, command: list[str], log, group: DeviceGroup) -> int:
        """Run `command` on `group`'s devices with its output in `log`; its exit status."""
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(group),
            check=False,
        ).returncode

    def _environment(self, group: DeviceGroup) -> dict[str, str]:
        """The launch's environment: its GPUs; without any, an equal share of the cores for
        each process running at once (unless the user exported OMP_NUM_THREADS, which the
        plugin then keeps, as it keeps any)."""
        environment = dict(os.environ)
        if group.gpus:
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(group.gpus)
        elif THREADS_VARIABLE not in environment:
            processes = sum(g.processes for g in self.groups)
            environment[THREADS_VARIABLE] = str(max(1, usable_cores() // processes))
        return environment

    @staticmethod
    def _collect(candidate: Candidate, trial_dir: Path) -> TrialRecord | None:
        path = trial_dir / SCORES_FILE
        if not path.is_file():
            return None
        return TrialRecord.of(candidate, **json.loads(path.read_text()))


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
