"""SFT with a KL term to the base: the fine-tuning loss plus beta x KL(base || model) on every
trained token, the usual way to keep a fine-tuned model near the one it started from (the
reference model of RLHF, used in SFT). Every weight trains; the base's next-token distributions
pull the model back on the same tokens the domain pulls it forward on.

It is a loss, Axolotl's `compute_loss_func` (the hook its EAFT loss uses): the trainer hands it
the model's outputs and labels, not the inputs, so a forward pre-hook keeps the batch's inputs for
the base's forward.
"""

import torch
import torch.nn.functional as F
from torch import nn

BETA = 1.0  # the KL weighted like the cross-entropy; fixed before any run, not tuned


class KLToBase:
    """`trainer.compute_loss_func` for SFT + `beta` x KL(base || model) per trained token, both
    summed over tokens and divided by the trainer's `num_items_in_batch` (as its own loss is)."""

    def __init__(self, model: nn.Module, base: nn.Module, beta: float = BETA) -> None:
        self.base = base.eval().requires_grad_(False)
        self.beta = beta
        self._inputs: dict[str, torch.Tensor] = {}
        self._handle = model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)

    def _keep_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("input_ids", "attention_mask", "position_ids")
        self._inputs = {k: kwargs[k] for k in names if kwargs.get(k) is not None}

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        targets = labels[:, 1:]
        trained = targets != -100
        logits = outputs.logits[:, :-1][trained].float()
        with torch.no_grad():
            base_logits = self.base(**self._inputs).logits[:, :-1][trained].float()
        count = num_items_in_batch if num_items_in_batch is not None else trained.sum()
        cross_entropy = F.cross_entropy(logits, targets[trained], reduction="sum")
        # KL(base || model) = sum_v p_base (log p_base - log p_model), in one call
        kl = F.kl_div(
            logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="sum"
        )
        return (cross_entropy + self.beta * kl) / count

    def remove(self) -> None:
        """Stop keeping the inputs (the model's later forwards are evaluation)."""
        self._handle.remove()
        self._inputs = {}
