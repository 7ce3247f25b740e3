"""The benchmark's scores, from its records alone (so they can be recomputed at any time).

- spec: the share of full fine-tuning's gain in held-out exact match a run gets,
  (run - base) / (reference - base), the reference being full fine-tuning's best rate.
- spec_nll: the same share of the gain in held-out NLL of the reference answers, which keeps
  counting where exact match saturates (a run at exact match 1.0 may have learned less).
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


def spec_nll(run: dict, base: dict, reference: float) -> float:
    gain = base["heldout_nll"] - reference
    return (base["heldout_nll"] - run["heldout_nll"]) / gain if gain != 0 else 0.0


def reference_exact_match(runs: list[dict]) -> float:
    """Full fine-tuning's exact match at its best rate (mean over seeds): the Spec reference."""
    return max(_reference_means(runs, "exact_match"))


def reference_heldout_nll(runs: list[dict]) -> float:
    """Full fine-tuning's held-out NLL at its best rate (mean over seeds): spec_nll's reference."""
    return min(_reference_means(runs, "heldout_nll"))


def _reference_means(runs: list[dict], measure: str) -> list[float]:
    """Full fine-tuning's mean of `measure` over seeds, per learning rate."""
    by_rate: dict[float, list[float]] = {}
    for run in runs:
        if run["method"] == REFERENCE and run["alpha"] is None:
            by_rate.setdefault(run["learning_rate"], []).append(run[measure])
    return [statistics.fmean(values) for values in by_rate.values()]
