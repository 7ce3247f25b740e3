"""The benchmark's scores, from its records alone (so they can be recomputed at any time).

- Spec: the share of full fine-tuning's domain gain a method gets, (run - base) / (full - base),
  on the plan's speciality metric: held-out exact match, or the held-out answers' NLL (lower is
  better) where a short budget leaves exact match near the floor. Full fine-tuning's reference is
  its best seed-0 run while sweeping and its reported mean in the table.
- Vers: base NLL / run NLL of the base model's own greedy answers to general prompts (1.0: the
  general behaviour is untouched).
- Uni = (Spec + Vers) / 2, the paper's unified score.
"""

import json
from pathlib import Path

from cofitune_plugin.jsonl import read_records

RUNS_FILE = "runs.jsonl"
BASE_FILE = "base.json"
REFERENCE = "full"


def read_runs(work: Path, method: str | None = None) -> list[dict]:
    """The finished runs (of `method`); a line cut by a crash is dropped and that run redone."""
    runs = read_records(work / RUNS_FILE, dict)
    return [r for r in runs if method is None or r["method"] == method]


def versatility(run: dict, base: dict) -> float:
    return base["retention_nll"] / run["retention_nll"]


def speciality(run: dict, base: dict, reference: float, metric: str) -> float:
    gain = reference - base[metric]
    return (run[metric] - base[metric]) / gain if gain != 0 else 0.0


def uni(run: dict, base: dict, reference: float, metric: str) -> float:
    return (speciality(run, base, reference, metric) + versatility(run, base)) / 2


def best_learning_rate(work: Path, method: str) -> float:
    """The swept rate whose first-seed run has the best Uni."""
    base = json.loads((work / BASE_FILE).read_text())
    plan = json.loads((work / "plan.json").read_text())
    metric, first = plan["speciality_metric"], plan["seeds"][0]
    pick = min if metric.endswith("nll") else max
    reference = pick(r[metric] for r in read_runs(work, REFERENCE) if r["seed"] == first)
    sweep = [r for r in read_runs(work, method) if r["seed"] == first]
    return max(sweep, key=lambda r: uni(r, base, reference, metric))["learning_rate"]
