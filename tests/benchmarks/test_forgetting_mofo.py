"""MoFO, the forgetting benchmark's optimizer rival: each step moves only the entries with the
largest momentum, and moves them as Adam would."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from mofo import MoFO  # noqa: E402


def _step(optimizer_cls, start: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> torch.Tensor:
    param = torch.nn.Parameter(start.clone())
    optimizer = optimizer_cls([param], lr=0.01, **kwargs)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


def test_a_step_moves_the_top_tenth_by_momentum_exactly_as_adam_would():
    torch.manual_seed(0)
    start, grad = torch.randn(10, 10), torch.randn(10, 10)
    moved = _step(MoFO, start, [grad], fraction=0.1)
    adam = _step(torch.optim.Adam, start, [grad])
    changed = moved != start
    assert int(changed.sum()) == 10
    top = grad.abs().flatten().topk(10).indices  # the first momentum is (1 - beta1) x grad
    assert set(changed.flatten().nonzero().flatten().tolist()) == set(top.tolist())
    assert torch.allclose(moved[changed], adam[changed])


def test_momentum_accumulates_over_every_entry_even_those_not_moved():
    """An entry held back at step 1 builds momentum and moves once it is among the largest."""
    start = torch.zeros(10)
    first = torch.tensor([1.0] + [0.0] * 9)
    second = torch.tensor([0.0, 0.9] + [0.0] * 8)
    moved = _step(MoFO, start, [first, second, second], fraction=0.1)
    assert moved[0] != 0  # moved at step 1
    assert moved[1] != 0  # its momentum overtook entry 0's by step 3
    assert torch.all(moved[2:] == 0)
