"""The benchmark's committed records: one file per run, so evidence adds up over sittings.

Layout, under `benchmarks/results/forgetting/BUDGET/DOMAIN/STAGE/`:

- `base.json`: the base model's scores on the stage's split, its greedy answers to the general
  prompts (what every run's retention is measured on) and its per-item results;
- `METHOD@RATE-seedS.json`: one trained run (with its WiSE-FT or dial points, when the plan
  evaluates them): its scores, its per-item results, and where it ran (machine, commit, date).
  A run recorded without the curve a later plan asks of it is trained again and rewritten with
  its points (`recorded`).

Beside the stages, `DOMAIN/search/` keeps the search's trials (`trials.jsonl`), its choice
(`chosen.yml`, what the default's rows trained) and its report; a later sitting trains the
default on this choice instead of searching again.

Each file carries the key of the plan it was measured under and of the base it was measured
against; the summary reads every file whose keys match the current plan and base, whichever
sitting (or machine of the same budget) wrote it, and counts the rest as not comparable.
"""

import datetime
import hashlib
import json
import subprocess
from pathlib import Path

from methods import CURVE_OF

BASE_FILE = "base.json"


def key_of(value: object) -> str:
    """A short, stable fingerprint of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run_file(records: Path, method: str, learning_rate: float, seed: int) -> Path:
    return records / f"{method}@{learning_rate:g}-seed{seed}.json"


def planned_alphas(plan: dict, method: str, learning_rate: float) -> list[float]:
    """The a of `method`'s interpolation the plan evaluates at `learning_rate` (none elsewhere)."""
    points = plan["interpolations"].get(CURVE_OF.get(method), {})
    return points["alphas"] if learning_rate in points.get("learning_rates", []) else []


def recorded(path: Path, alphas: list[float]) -> bool:
    """Whether `path` holds its trained run and a point at each of `alphas`."""
    if not path.exists():
        return False
    found = {run["alpha"] for run in json.loads(path.read_text())["runs"]}
    return None in found and set(alphas) <= found


def provenance(repo: Path, machine: dict) -> dict:
    """Where and when a record was made: the machine, the commit (and whether the tree had
    uncommitted changes), the date."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return result.stdout.strip()

    return {
        "machine": machine,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_record(path: Path, record: dict) -> None:
    """Write `record` whole or not at all (a crash leaves no half file to be read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def read_base(records: Path) -> dict | None:
    path = records / BASE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_runs(records: Path, plan_key: str, base_key: str) -> tuple[list[dict], list[str]]:
    """Every run recorded in `records` under this plan and base, each with its provenance, and
    the files that were measured under another plan or base (not comparable, so not read)."""
    runs, other = [], []
    for path in sorted(records.glob("*@*-seed*.json")):
        record = json.loads(path.read_text())
        if record["plan_key"] != plan_key or record["base_key"] != base_key:
            other.append(path.name)
            continue
        where = {k: record[k] for k in ("commit", "date")} | {"file": path.name}
        runs += [run | {"provenance": where} for run in record["runs"]]
    return runs, other
