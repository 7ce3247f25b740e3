"""The dial's interpolation on a tiny llama: exact at its ends, linear between, selection only."""

import pytest
import torch

from cofitune_plugin.dial import Dial, DialError, check_same_base, selection_values
from cofitune_plugin.selection import select
from helpers import tiny_model


def tuned_copy(seed: int = 1):
    """A base tiny llama and a copy whose selection (layers 2-3 FFN) moved by random noise."""
    base, tuned = tiny_model("llama"), tiny_model("llama")
    selection = select(tuned, "25%-50%", ["ffn"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in selection.parameters:
            param = tuned.get_parameter(name)
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return base, tuned, list(selection.parameters)


def test_alpha_0_is_the_base_and_1_the_tuned_model_bitwise_and_half_is_the_midpoint():
    base, tuned, selection = tuned_copy()
    tuned_values = selection_values(tuned, selection)
    before = {n: p.clone() for n, p in tuned.named_parameters()}
    dial = Dial(tuned, selection_values(base, selection))

    dial.set(0.0)
    for name, param in tuned.named_parameters():
        assert torch.equal(param, base.get_parameter(name)), name
    dial.set(0.5)
    for name in selection:
        expected = (base.get_parameter(name) + tuned_values[name]) / 2
        torch.testing.assert_close(tuned.get_parameter(name), expected)
    dial.set(1.0)
    for name, param in tuned.named_parameters():
        assert torch.equal(param, before[name]), name


def test_alpha_ends_are_exact_in_bfloat16_too():
    base, tuned, selection = tuned_copy()
    base, tuned = base.to(torch.bfloat16), tuned.to(torch.bfloat16)
    tuned_values = selection_values(tuned, selection)
    dial = Dial(tuned, selection_values(base, selection))
    dial.set(0.0)
    assert all(torch.equal(tuned.get_parameter(n), base.get_parameter(n)) for n in selection)
    dial.set(1.0)
    assert all(torch.equal(tuned.get_parameter(n), tuned_values[n]) for n in selection)


def test_a_model_changed_outside_the_selection_is_refused():
    base, tuned, selection = tuned_copy()
    check_same_base(base, tuned, selection)
    with torch.no_grad():
        tuned.get_parameter("model.layers.0.self_attn.q_proj.weight")[0, 0] += 1e-3
    with pytest.raises(DialError, match=r"layers.0.self_attn.q_proj.weight is outside the sel"):
        check_same_base(base, tuned, selection)
    with pytest.raises(DialError, match="not the base's"):
        check_same_base(base, tiny_model("gpt_neox"), selection)
