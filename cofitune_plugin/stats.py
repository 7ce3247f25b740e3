"""Paired intervals and dominance judged on them: is a difference between two models more than
the noise of the items (and seeds) it was measured on?

Both the forgetting benchmark's table and the after-training report compare two models scored
on the same items, so the comparison is paired: each bootstrap draw resamples the items (and
the seeds, paired by index) once and applies the draw to both models. A difference whose 95%
interval holds 0 is a tie, not a win.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95

# (seeds, items, columns) -> one float: a metric of a model computed from its per-item columns
Statistic = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A difference's point estimate (on the data as measured) and its percentile interval."""

    estimate: float
    low: float
    high: float

    @property
    def sign(self) -> int:
        """+1 when the whole interval is above 0, -1 when below, 0 (a tie) when it holds 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    statistic: Statistic,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """The interval of statistic(a) - statistic(b), `a` and `b` of shape (seeds, items, ...),
    paired on both axes: each draw takes seeds and items with replacement, the same for both.
    One seed gives an interval over items alone."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"paired data must share seeds and items: {a.shape} vs {b.shape}")
    seeds, items = a.shape[:2]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for k in range(resamples):
        s = rng.integers(0, seeds, seeds)[:, None]
        i = rng.integers(0, items, items)[None, :]
        draws[k] = statistic(a[s, i]) - statistic(b[s, i])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(statistic(a) - statistic(b)), float(low), float(high))


def mean_of_seeds(per_seed: Callable[[np.ndarray], np.ndarray]) -> Statistic:
    """A row's metric as the benchmark reports it: the mean over seeds of a per-seed value
    (`per_seed` maps (seeds, items, ...) to (seeds,))."""
    return lambda x: float(np.mean(per_seed(x)))


def weakly_dominates(differences: Mapping[str, Interval]) -> bool:
    """A (the minuend of every difference) weakly dominates B: on no axis is A's difference
    surely below 0, and on at least one it is surely above. Ties (intervals holding 0) neither
    win nor lose, so two models equal on one axis are still ordered by the other."""
    signs = [d.sign for d in differences.values()]
    return min(signs) >= 0 and max(signs) > 0
