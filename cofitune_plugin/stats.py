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
_CHUNK = 100  # resamples computed at once: bounds the memory of the fancy-indexed copies

# (..., seeds, items, columns) -> (...): a metric of a model from its per-item columns, over
# any leading axes (the resamples)
Statistic = Callable[[np.ndarray], np.ndarray]


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


def _three_axes(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[..., None] if x.ndim == 2 else x


def bootstrap_draws(
    x: np.ndarray, statistic: Statistic, resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
    """`statistic` on `resamples` draws of `x` (seeds, items[, columns]), each draw taking seeds
    and items with replacement. The draws depend only on `seed` and the shape, so two models
    with the same seeds and items get the same draws: their draws' differences are a paired
    bootstrap of the difference."""
    x = _three_axes(x)
    seeds, items = x.shape[:2]
    rng = np.random.default_rng(seed)
    s = rng.integers(0, seeds, (resamples, seeds))
    i = rng.integers(0, items, (resamples, items))
    return np.concatenate(
        [
            statistic(x[s[k : k + _CHUNK, :, None], i[k : k + _CHUNK, None, :]])
            for k in range(0, resamples, _CHUNK)
        ]
    )


def interval(estimate: float, draws: np.ndarray, level: float = LEVEL) -> Interval:
    """The percentile interval of `draws` around the measured `estimate`."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    statistic: Statistic,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """The interval of statistic(a) - statistic(b), `a` and `b` of shape (seeds, items[, ...]),
    paired on both axes: each draw takes the same seeds and items of both. One seed gives an
    interval over items alone."""
    a, b = _three_axes(a), _three_axes(b)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"paired data must share seeds and items: {a.shape} vs {b.shape}")
    draws = bootstrap_draws(a, statistic, resamples, seed)
    draws -= bootstrap_draws(b, statistic, resamples, seed)
    return interval(float(statistic(a) - statistic(b)), draws, level)


def mean_of_seeds(per_seed: Callable[[np.ndarray], np.ndarray]) -> Statistic:
    """A row's metric as the benchmark reports it: the mean over seeds of a per-seed value
    (`per_seed` maps (..., seeds, items, columns) to (..., seeds))."""
    return lambda x: np.mean(per_seed(x), axis=-1)


def weakly_dominates(differences: Mapping[str, Interval]) -> bool:
    """A (the minuend of every difference) weakly dominates B: on no axis is A's difference
    surely below 0, and on at least one it is surely above. Ties (intervals holding 0) neither
    win nor lose, so two models equal on one axis are still ordered by the other."""
    signs = [d.sign for d in differences.values()]
    return min(signs) >= 0 and max(signs) > 0
