"""The forgetting benchmark's frontier arithmetic: WiSE-FT's ends, what lies above a point
(judged on paired intervals, ties included), and the dev stage's picks."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from summary import (  # noqa: E402
    SPEC_MATCH,
    difference,
    dominated_by,
    fine_level,
    frontiers,
    picks,
)

from cofitune_plugin.dial import Dial  # noqa: E402
from cofitune_plugin.session import checkpoint_values  # noqa: E402
from cofitune_plugin.stats import bootstrap_draws, mean_of_seeds  # noqa: E402


def _row(
    method: str,
    spec: float,
    vers: float,
    lr: float = 1e-4,
    alpha: float | None = None,
    spec_nll: float | None = None,
):
    """A row at (spec, vers) on both axes, measured without noise: every bootstrap draw is
    the point itself. Its Spec NLL is its Spec unless given."""
    return {
        "method": method,
        "learning_rate": lr,
        "alpha": alpha,
        "default_recipe": False,
        "seeds": [0],
        "spec": {"mean": spec, "std": 0.0},
        "spec_nll": {"mean": spec if spec_nll is None else spec_nll, "std": 0.0},
        "vers_bench": {"mean": vers, "std": 0.0},
        "vers_retention": {"mean": vers, "std": 0.0},
        "_draws": {
            metric: np.full(2000, value)
            for metric, value in (("spec", spec), ("vers_bench", vers), ("vers_retention", vers))
        },
    }


def test_wise_ft_ends_are_the_base_and_the_full_run_read_from_the_checkpoint(tmp_path):
    """WiSE-FT's a = 0 is the base checkpoint's weights and a = 1 the tuned ones, bitwise, over
    every parameter, with the base read back from disk as the benchmark does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    save_file(base, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    tuned = {name: p.detach().clone() for name, p in model.named_parameters()}

    dial = Dial(model, checkpoint_values(tmp_path, list(base)))
    dial.set(0.0)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    dial.set(0.5)
    assert all(torch.allclose(p, (base[n] + tuned[n]) / 2) for n, p in model.named_parameters())
    dial.set(1.0)
    assert all(torch.equal(p, tuned[n]) for n, p in model.named_parameters())


def test_wise_ft_curve_runs_from_the_base_through_each_a_to_its_full_run():
    rows = [
        _row("full", 1.0, 0.80, lr=1e-4),
        _row("full", 0.9, 0.95, lr=1e-5),
        _row("wise-ft", 0.7, 0.97, lr=1e-4, alpha=0.5),
        _row("wise-ft", 0.4, 0.99, lr=1e-4, alpha=0.25),
    ]
    lines = frontiers(rows)
    assert [r["learning_rate"] for r in lines["full"]] == [1e-5, 1e-4]
    curve = lines["wise-ft"]
    assert [(p["spec"]["mean"], p["vers_bench"]["mean"]) for p in curve] == [
        (0.0, 1.0),
        (0.4, 0.99),
        (0.7, 0.97),
        (1.0, 0.80),
    ]


@pytest.mark.parametrize(
    ("vers", "expected"),
    [(0.93, ["the full line"]), (0.95, [])],
)
def test_a_point_under_a_frontier_line_is_dominated_by_it(vers, expected):
    """Between full fine-tuning's points (0.5, 1.0) and (1.0, 0.9) the line at Spec 0.8 is at
    0.94: a point there below 0.94 is dominated by the line, one above it is not."""
    rows = [_row("full", 0.5, 1.0, lr=1e-5), _row("full", 1.0, 0.9, lr=1e-4)]
    point = _row("cofitune", 0.8, vers)
    dominated = dominated_by(point, [*rows, point], "vers_bench")
    assert dominated == expected


def test_a_point_above_on_both_axes_dominates_and_one_above_on_one_does_not():
    point = _row("cofitune", 0.9, 0.9)
    rows = [point, _row("lora", 0.95, 0.95), _row("hft", 0.95, 0.85), _row("freeze", 0.8, 0.99)]
    assert dominated_by(point, rows, "vers_bench") == ["lora lr=0.0001"]


def test_a_tie_at_the_ceiling_does_not_hide_a_row_above_on_the_other_axis():
    """Both rows at Spec 1.0 (exact match's ceiling): the one higher on versatility dominates;
    strict `>` on both axes would have said nothing dominates."""
    point = _row("cofitune", 1.0, 0.90)
    rows = [point, _row("lora", 1.0, 0.95), _row("hft", 1.0, 0.90)]
    assert dominated_by(point, rows, "vers_bench") == ["lora lr=0.0001"]
    assert dominated_by(rows[2], rows, "vers_retention") == ["lora lr=0.0001"]  # hft ties point


def test_a_difference_inside_the_noise_is_a_tie_and_dominates_nothing():
    """0.01 above on both axes: a row above without noise, a tie when the paired draws spread
    by 0.05."""
    point, above = _row("cofitune", 0.90, 0.90), _row("lora", 0.91, 0.91)
    assert dominated_by(point, [point, above], "vers_bench") == ["lora lr=0.0001"]
    spread = np.random.default_rng(9).normal(0, 0.05, 2000)
    above["_draws"] = {metric: draws + spread for metric, draws in above["_draws"].items()}
    assert dominated_by(point, [point, above], "vers_bench") == []


def test_dev_picks_the_best_matched_rate_and_the_claims_two_methods_two_best():
    rows = [
        _row("full", 1.0, 0.80, lr=2e-4),
        _row("full", 0.98, 0.95, lr=4e-5),
        _row("full", 0.96, 0.97, lr=2e-5),
        _row("full", 0.80, 0.99, lr=1e-5),  # keeps the most, but below matched Spec
        _row("cofitune-default", 0.97, 0.99, lr=4e-5),
        _row("cofitune-default", 0.99, 0.98, lr=8e-5),
        # exact match saturated, held-out NLL short of full fine-tuning's gain: not matched
        _row("cofitune-default", 1.0, 1.0, lr=2e-5, spec_nll=0.90),
        _row("freeze", 0.70, 0.99, lr=1e-5),
        _row("freeze", 0.99, 0.98, lr=2e-4, spec_nll=0.85),  # never matched: its highest
        _row("freeze", 0.90, 0.97, lr=1e-4),  # speciality, the lower of Spec and Spec NLL
        _row("wise-ft", 0.99, 0.99, lr=2e-4, alpha=0.5),  # not a trained rate
    ]
    assert SPEC_MATCH == 0.95
    assert picks(rows) == {
        "full": [2e-5, 4e-5],
        "cofitune-default": [4e-5, 8e-5],
        "freeze": [1e-4],
    }


def _measured(method: str, seeds: list[int], hits: np.ndarray) -> dict:
    """A row from per-item hits (seeds x items), every metric their mean over items and seeds,
    with the draws and data `summary._bootstrap` gives a row."""
    statistic = mean_of_seeds(lambda x: x[..., 0].mean(-1))
    data = hits[:, :, None].astype(float)
    row = _row(method, float(statistic(data)), float(statistic(data)))
    row["seeds"] = seeds
    row["_data"] = {m: data for m in ("spec", "vers_bench", "vers_retention")}
    row["_statistics"] = {m: statistic for m in row["_data"]}
    row["_draws"] = {m: bootstrap_draws(data, statistic) for m in row["_data"]}
    return row


def test_rows_of_different_seeds_are_paired_on_the_seeds_both_have_and_else_not_compared():
    """A row of seeds 0-2 against one of seed 0: the difference is the paired bootstrap of
    seed 0 alone (seeds 1-2, far above, do not count); with no seed in common nothing is
    claimed, so nothing dominates."""
    rng = np.random.default_rng(0)
    three = (rng.random((3, 200)) < 0.5).astype(float)
    three[1:] = 1.0  # seeds 1 and 2 answer everything: on the means, far above
    one = three[:1].copy()
    many, single = _measured("lora", [0, 1, 2], three), _measured("cofitune", [0], one)
    differences = difference(many, single)
    assert differences["spec"].estimate == 0.0
    assert differences["spec"].low == differences["spec"].high == 0.0  # the same items: a tie
    assert dominated_by(single, [single, many], "vers_bench") == []

    elsewhere = _measured("lora", [1, 2], three[1:])
    assert difference(elsewhere, single) is None
    assert dominated_by(single, [single, elsewhere], "vers_bench") == []


def test_the_fine_level_compares_the_masked_selection_with_each_control_where_dev_chose():
    """The (masked) default's trained run (not its dial's point) against the selection without
    a mask and against the permuted mask, each at the rate the dev stage chose for it (where a
    dial was picked, the rate its a was picked at), and against the permuted mask at the
    default's own rate; a control with no test row there answers nothing."""
    rows = [
        _row("cofitune-default-unmasked", 0.98, 0.90, lr=4e-5),
        _row("cofitune-default-unmasked", 0.99, 0.80, lr=8e-5),
        _row("cofitune-default", 0.97, 0.95, lr=1.6e-4),
        _row("cofitune-dial", 0.90, 0.99, lr=1.6e-4, alpha=0.75),
        _row("cofitune-default-permuted", 0.96, 0.94, lr=8e-5),
        _row("cofitune-default-permuted", 0.99, 0.91, lr=1.6e-4),
    ]
    chosen = {
        "cofitune-default-unmasked": [4e-5, 8e-5],
        "cofitune-default": [8e-5, 1.6e-4],
        "cofitune-default-permuted": [8e-5],
    }
    alphas = {"cofitune-dial": {"learning_rate": 1.6e-4, "alpha": 0.75}}
    found = fine_level({"rows": rows}, chosen, alphas)
    assert found["importance"]["control"] == "cofitune-default-permuted lr=8e-05"
    assert found["importance"]["with"] == "cofitune-default lr=0.00016"
    assert found["importance"]["estimate"]["vers_retention"] == pytest.approx(0.01)
    assert found["importance"]["vers_retention"] == pytest.approx([0.01, 0.01])
    assert found["importance_same_rate"]["control"] == "cofitune-default-permuted lr=0.00016"
    assert found["importance_same_rate"]["estimate"]["vers_retention"] == pytest.approx(0.04)
    assert found["mask"]["control"] == "cofitune-default-unmasked lr=4e-05"
    assert found["mask"]["estimate"]["spec"] == pytest.approx(-0.01)
    assert found["mask"]["estimate"]["vers_bench"] == pytest.approx(0.05)

    alphas["cofitune-dial-unmasked"] = {"learning_rate": 8e-5, "alpha": 1.0}
    assert fine_level({"rows": rows}, chosen, alphas)["mask"]["control"] == (
        "cofitune-default-unmasked lr=8e-05"
    )
    del chosen["cofitune-default-unmasked"], alphas["cofitune-dial-unmasked"]
    assert list(fine_level({"rows": rows}, chosen, alphas)) == [
        "importance",
        "importance_same_rate",
    ]
