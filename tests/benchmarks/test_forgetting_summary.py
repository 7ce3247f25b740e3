"""The forgetting benchmark's frontier arithmetic: WiSE-FT's ends, and what lies above a point."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from summary import AXES, dominated_by, frontiers, goal_checks  # noqa: E402

from cofitune_plugin.dial import Dial  # noqa: E402
from cofitune_plugin.session import checkpoint_values  # noqa: E402


def _row(method: str, spec: float, vers: float, lr: float = 1e-4, alpha: float | None = None):
    point = {"mean": spec, "std": 0.0}
    return {
        "method": method,
        "learning_rate": lr,
        "alpha": alpha,
        "default_recipe": False,
        "spec": point,
        "vers_bench": {"mean": vers, "std": 0.0},
        "vers_retention": {"mean": vers, "std": 0.0},
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


def test_the_default_recipe_is_a_frontier_and_meets_the_goal_where_one_rate_does():
    """CoFiTune's default at several rates is a line like full fine-tuning's; the goal is met by
    the rate that passes every bar with nothing above it, and only by that one."""
    default = [
        {**_row("cofitune-default", 0.90, 0.99, lr=6e-5), "default_recipe": True},
        {**_row("cofitune-default", 0.97, 0.98, lr=1e-4), "default_recipe": True},
    ]
    rows = [_row("full", 1.0, 0.80, lr=2e-4), _row("full", 0.8, 0.97, lr=2e-5), *default]
    assert [r["learning_rate"] for r in frontiers(rows)["cofitune-default"]] == [6e-5, 1e-4]
    for row in rows:
        row["dominated_by"] = {axis: dominated_by(row, rows, axis) for axis in AXES}
    goal = goal_checks(rows)
    assert goal["met_by"] == ["cofitune-default lr=0.0001"]
    assert goal["rows"]["cofitune-default lr=6e-05"]["spec"] is False
