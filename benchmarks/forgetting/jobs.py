"""The benchmark's processes, run a few at a time on a CPU, each on its share of the cores.

On a 2-core CPU one training process of 2 threads does less than two of 1 thread each (measured
for full fine-tuning of SmolLM2-135M, batch 8: 3.9 s/step with 2 threads; 6.5-6.8 s/step each
with two 1-thread processes side by side, so 1.15-1.2x more work done). So the benchmark runs
`slots` processes at once, each with `OMP_NUM_THREADS` = cores // slots, and each process's
output goes to its own log file.

A job starts when the jobs it needs have finished; jobs start in the order given, so the
longest chain (importance, then the search, then CoFiTune's default) goes first.
"""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    """One process: `command`, run once every job named in `after` has finished, skipped when
    `done()` says its output is already there."""

    name: str
    command: list[str]
    done: Callable[[], bool]
    after: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0


def run_jobs(jobs: list[Job], slots: int, logs: Path, cwd: Path) -> None:
    """Run `jobs` at most `slots` at a time; exit when one fails (its log's tail is printed;
    the others are stopped: every finished run is on record, so the command resumes)."""
    names = {job.name for job in jobs}
    for job in jobs:
        if missing := set(job.after) - names:
            raise ValueError(f"job {job.name} waits for unknown jobs {sorted(missing)}")
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // slots)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    finished = {job.name for job in jobs if job.done()}
    waiting = [job for job in jobs if job.name not in finished]
    running: list[Job] = []
    print(
        f"{len(waiting)} jobs to run ({len(finished)} already done), {slots} at a time, "
        f"{threads} thread(s) each; logs in {logs}",
        flush=True,
    )
    while waiting or running:
        for job in [j for j in waiting if set(j.after) <= finished]:
            if len(running) >= slots:
                break
            log = (logs / f"{job.name}.log").open("a")
            job.process = subprocess.Popen(
                job.command, cwd=cwd, env=environment, stdout=log, stderr=subprocess.STDOUT
            )
            job.started = time.perf_counter()
            waiting.remove(job)
            running.append(job)
            print(f"start  {job.name}  ({len(waiting)} waiting)", flush=True)
        time.sleep(2)
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            minutes = (time.perf_counter() - job.started) / 60
            if job.process.returncode != 0:
                for other in running:
                    other.process.terminate()
                tail = (logs / f"{job.name}.log").read_text()[-4000:]
                sys.exit(f"{job.name} failed after {minutes:.1f} min:\n{tail}")
            finished.add(job.name)
            print(f"done   {job.name}  {minutes:.1f} min", flush=True)
        if waiting and not running and not any(set(j.after) <= finished for j in waiting):
            raise RuntimeError(f"jobs that can never start: {[j.name for j in waiting]}")
