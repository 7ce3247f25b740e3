"""The dial between the base and the tuned model: weights base + a (tuned - base), over the
CoFiTune selection only.

CoFiTune changes only a small selection of the weights, so every model between the base (a = 0)
and the tuned one (a = 1) is one interpolation of that selection away: trading a little
speciality for more versatility costs evaluation, not another training run. Plain PyTorch: the
callers load the models and score them.
"""

from collections.abc import Iterable

import torch
from torch import Tensor, nn

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


class DialError(ValueError):
    """A tuned model that is not the recipe's base plus a change in the selection."""


def check_same_base(base: nn.Module, tuned: nn.Module, selection: Iterable[str]) -> None:
    """Refuse a tuned model whose weights outside `selection` differ from the base's (bitwise),
    or whose parameters are not the base's: another checkpoint, or another recipe's output."""
    selected = set(selection)
    base_params = dict(base.named_parameters())
    tuned_params = dict(tuned.named_parameters())
    if base_params.keys() != tuned_params.keys():
        missing = sorted(base_params.keys() ^ tuned_params.keys())[:3]
        raise DialError(f"the tuned model's parameters are not the base's (e.g. {missing})")
    absent = sorted(selected - base_params.keys())[:3]
    if absent:
        raise DialError(f"the selection names parameters the model lacks: {absent}")
    for name, param in base_params.items():
        other = tuned_params[name]
        if param.shape != other.shape:
            raise DialError(f"{name}: shape {tuple(other.shape)}, the base's {tuple(param.shape)}")
        if name not in selected and not torch.equal(param.detach().cpu(), other.detach().cpu()):
            raise DialError(
                f"{name} is outside the selection but differs from the base: this model was not "
                "trained from the recipe's base with this selection"
            )


class Dial:
    """Moves `model`'s selected parameters, in place, between the base's values and the values
    they held when the dial was made (the tuned ones)."""

    def __init__(self, model: nn.Module, base: dict[str, Tensor]) -> None:
        """`base`: the base model's values of the selected parameters, by name."""
        self.params = {name: model.get_parameter(name) for name in base}
        self.tuned = {name: p.detach().clone() for name, p in self.params.items()}
        self.base = {
            name: value.detach().to(self.params[name].device, self.params[name].dtype).clone()
            for name, value in base.items()
        }

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        """base + alpha (tuned - base), computed in float32. `torch.lerp` returns the start at
        weight 0 and the end at weight 1 exactly, so a = 0 is the base and a = 1 the tuned model,
        bitwise."""
        for name, param in self.params.items():
            mixed = torch.lerp(self.base[name].float(), self.tuned[name].float(), alpha)
            param.copy_(mixed.to(param.dtype))


def selection_values(model: nn.Module, selection: Iterable[str]) -> dict[str, Tensor]:
    """The current values of the selected parameters, on the CPU."""
    return {name: model.get_parameter(name).detach().cpu().clone() for name in selection}
