"""The benchmark's scores, from its records alone (so they can be recomputed at any time).

- spec: the share of full fine-tuning's gain in held-out exact match a run gets,
  (run - base) / (reference - base), the reference being full fine-tuning's best rate.
- vers_bench: the run's mean accuracy over the general benchmarks / the base's.
- vers_retention: base NLL / run NLL of the base model's own greedy answers to general prompts
  (1.0: the general behaviour is untouched).
"""

import statistics

REFERENCE = "full"


def mean_bench(scores: dict[str, float]) -> float:
    return statistics.fmean(scores.values())


def vers_bench(run: dict, base: dict) -> float:
    return mean_bench(run["bench"]) / mean_bench(base["bench"])


def vers_retention(run: dict, base: dict) -> float:
    return base["retention_nll"] / run["retention_nll"]


def spec(run: dict, base: dict, reference: float) -> float:
    gain = reference - base["exact_match"]
    return (run["exact_match"] - base["exact_match"]) / gain if gain != 0 else 0.0


def reference_exact_match(runs: list[dict]) -> float:
    """Full fine-tuning's exact match at its best rate (mean over seeds): the Spec reference."""
    by_rate: dict[float, list[float]] = {}
    for run in runs:
        if run["method"] == REFERENCE and run["alpha"] is None:
            by_rate.setdefault(run["learning_rate"], []).append(run["exact_match"])
    return max(statistics.fmean(values) for values in by_rate.values())
