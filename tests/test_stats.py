"""Paired bootstrap intervals and dominance judged on them (cofitune_plugin.stats)."""

import numpy as np
import pytest

from cofitune_plugin.stats import Interval, mean_of_seeds, paired_bootstrap, weakly_dominates

MEAN = mean_of_seeds(lambda x: x[..., 0].mean(axis=-1))


def test_the_bootstrap_recovers_a_known_difference():
    """B is A less 0.1 plus per-item noise: the interval holds 0.1, lies above 0, and is narrower
    than the unpaired spread of the items (pairing removes what the items share)."""
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(3, 400))
    b = a - 0.1 + rng.normal(0.0, 0.05, size=a.shape)
    interval = paired_bootstrap(a, b, MEAN)
    assert interval.estimate == pytest.approx(a.mean() - b.mean())
    assert interval.low < 0.1 < interval.high
    assert interval.sign == 1
    assert interval.high - interval.low < 0.05  # unpaired, the items' sd alone is ~0.1


def test_identical_rows_centre_on_zero_and_tie():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2, size=(3, 300)).astype(float)  # 0/1 hits, as benchmark items are
    interval = paired_bootstrap(a, a.copy(), MEAN)
    assert interval == Interval(0.0, 0.0, 0.0)
    assert interval.sign == 0


def test_a_noisy_zero_difference_holds_zero_and_a_ratio_statistic_is_paired_too():
    """Two models with independent 0/1 hits at the same rate: the interval holds 0. A ratio of
    sums (how retention pools NLL over tokens) goes through the same resampling."""
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 2, size=(3, 300)).astype(float) for _ in range(2))
    assert paired_bootstrap(a, b, MEAN).sign == 0
    nll = rng.uniform(1.0, 2.0, size=(3, 50, 1))
    tokens = rng.integers(5, 30, size=(3, 50, 1)).astype(float)
    tuned = np.concatenate([nll * 1.2 * tokens, tokens], axis=2)
    base = np.concatenate([nll * tokens, tokens], axis=2)
    per_token = mean_of_seeds(lambda x: x[..., 0].sum(-1) / x[..., 1].sum(-1))
    interval = paired_bootstrap(tuned, base, per_token)
    assert interval.sign == 1 and interval.low > 0


def test_the_bootstrap_is_seeded_and_refuses_unpaired_shapes():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 100)), rng.normal(size=(2, 100))
    assert paired_bootstrap(a, b, MEAN) == paired_bootstrap(a, b, MEAN)
    with pytest.raises(ValueError, match="share seeds and items"):
        paired_bootstrap(a, b[:, :50], MEAN)


def _axis(low: float, high: float) -> Interval:
    return Interval((low + high) / 2, low, high)


@pytest.mark.parametrize(
    ("spec", "vers", "expected"),
    [
        ((0.01, 0.03), (0.02, 0.05), True),  # above on both
        ((-0.01, 0.01), (0.02, 0.05), True),  # a tie on Spec (both at the ceiling), above on Vers
        ((0.0, 0.0), (0.01, 0.02), True),  # an exact tie counts as a tie, not as a loss
        ((-0.01, 0.01), (-0.02, 0.03), False),  # ties on both: neither dominates
        ((0.01, 0.03), (-0.05, -0.01), False),  # above on one, below on the other
        ((-0.03, -0.01), (0.05, 0.08), False),
    ],
)
def test_weak_dominance_is_judged_on_intervals_with_ties(spec, vers, expected):
    assert weakly_dominates({"spec": _axis(*spec), "vers": _axis(*vers)}) is expected
