"""MoFO (Chen et al., 2024, "MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in
LLM Fine-Tuning"): Adam whose step moves, in each parameter tensor, only the entries with the
largest first moment. Every weight may train, but each step changes a small share of them, so
the model stays near the base without choosing the weights in advance: the closest rival to a
selection method such as CoFiTune's."""

import torch
from torch import nn

FRACTION = 0.1  # the share of each tensor's entries a step moves (the paper's default 10%)


class MoFO(torch.optim.Optimizer):
    """Adam moments over every entry; the bias-corrected Adam update applied only to the
    `fraction` of each tensor's entries with the largest |first moment|."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fraction: float = FRACTION,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "fraction": fraction})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(param, dtype=torch.float32)
                    state["v"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                m, v, grad = state["m"], state["v"], param.grad.float()
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1 ** state["step"])) / (
                    (v / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                )
                magnitude = m.abs().flatten()
                keep = max(1, int(group["fraction"] * magnitude.numel()))
                threshold = magnitude.kthvalue(magnitude.numel() - keep + 1).values
                update.mul_(m.abs() >= threshold)
                param.sub_(update.to(param.dtype), alpha=group["lr"])
        return loss


def mofo(model: nn.Module, learning_rate: float) -> MoFO:
    """MoFO over the model's trainable parameters."""
    return MoFO([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
