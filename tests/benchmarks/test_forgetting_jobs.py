"""The forgetting benchmark's process scheduler: order, slots, threads, skips and failures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from jobs import Job, run_jobs  # noqa: E402


def _job(tmp_path: Path, name: str, after: tuple[str, ...] = (), code: str = "") -> Job:
    """A job that records when it ran, with how many threads, and how many jobs ran with it."""
    script = f"""
import os, pathlib, time
d = pathlib.Path({str(tmp_path)!r})
(d / "{name}.running").touch()
time.sleep(0.3)
together = len(list(d.glob("*.running")))
(d / "{name}.running").unlink()
(d / "{name}.done").write_text(f"{{time.time()}} {{os.environ['OMP_NUM_THREADS']}} {{together}}")
{code}
"""
    return Job(name, [sys.executable, "-c", script], (tmp_path / f"{name}.done").exists, after)


def _record(tmp_path: Path, name: str) -> tuple[float, str, int]:
    finished, threads, together = (tmp_path / f"{name}.done").read_text().split()
    return float(finished), threads, int(together)


def test_jobs_wait_for_what_they_need_and_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    jobs = [
        _job(tmp_path, "a"),
        _job(tmp_path, "b"),
        _job(tmp_path, "c", after=("a", "b")),
        _job(tmp_path, "d", after=("c",)),
    ]
    run_jobs(jobs, slots=2, logs=tmp_path / "logs", cwd=tmp_path)
    a, b, c, d = (_record(tmp_path, name) for name in "abcd")
    assert c[0] > max(a[0], b[0]) and d[0] > c[0]
    assert {a[1], b[1], c[1], d[1]} == {"2"}  # 4 cores, 2 slots
    assert max(r[2] for r in (a, b, c, d)) <= 2
    assert (tmp_path / "logs" / "d.log").exists()


def test_done_jobs_are_skipped(tmp_path):
    (tmp_path / "a.done").write_text("0 1 1")
    jobs = [_job(tmp_path, "a"), _job(tmp_path, "b", after=("a",))]
    run_jobs(jobs, slots=1, logs=tmp_path / "logs", cwd=tmp_path)
    assert (tmp_path / "a.done").read_text() == "0 1 1"
    assert (tmp_path / "b.done").exists()


def test_a_failed_job_stops_the_run_with_its_log(tmp_path):
    jobs = [
        _job(tmp_path, "bad", code="raise SystemExit('broken on purpose')"),
        _job(tmp_path, "next", after=("bad",)),
    ]
    with pytest.raises(SystemExit, match="(?s)bad failed.*broken on purpose"):
        run_jobs(jobs, slots=1, logs=tmp_path / "logs", cwd=tmp_path)
    assert not (tmp_path / "next.done").exists()


def test_a_job_waiting_for_an_unknown_job_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([_job(tmp_path, "a", after=("typo",))], 1, tmp_path / "logs", tmp_path)
    assert not (tmp_path / "a.done").exists()
