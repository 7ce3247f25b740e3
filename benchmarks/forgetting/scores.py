"""The benchmark's scores, from its records alone (so they can be recomputed at any time).

- Spec: held-out exact match over that of full fine-tuning (its best seed-0 run while sweeping,
  its reported mean in the table): how much of plain fine-tuning's domain gain a method gets.
- Vers: base NLL / run NLL of the base model's own greedy answers to general prompts (1.0: the
  general behaviour is untouched).
- Uni = (Spec + Vers) / 2, the paper's unified score.
"""

import json
from pathlib import Path

RUNS_FILE = "runs.jsonl"
REFERENCE = "full"


def read_runs(work: Path, method: str | None = None) -> list[dict]:
    path = work / RUNS_FILE
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: that run is redone
            continue
    return [r for r in runs if method is None or r["method"] == method]


def versatility(run: dict, base: dict) -> float:
    return base["retention_nll"] / run["retention_nll"]


def uni(run: dict, base: dict, reference_exact_match: float) -> float:
    spec = run["exact_match"] / reference_exact_match if reference_exact_match > 0 else 0.0
    return (spec + versatility(run, base)) / 2


def best_learning_rate(work: Path, method: str) -> float:
    """The swept rate whose first-seed run has the best Uni."""
    base = json.loads((work / "base.json").read_text())
    plan = json.loads((work / "plan.json").read_text())
    first = plan["seeds"][0]
    reference = max(r["exact_match"] for r in read_runs(work, REFERENCE) if r["seed"] == first)
    sweep = [r for r in read_runs(work, method) if r["seed"] == first]
    return max(sweep, key=lambda r: uni(r, base, reference))["learning_rate"]
