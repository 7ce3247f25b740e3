"""DFT (Dynamic Fine-Tuning, Wu et al. 2025, arXiv 2508.05629): each trained token's
cross-entropy weighted by the model's own probability of it, detached, -sg[p(y_t)] log p(y_t).
Its gradient is -grad p(y_t): tokens the model finds unlikely pull less, so the update stays
closer to what the model already does.

Axolotl ships it as `use_dft` from 0.20 on (`axolotl/monkeypatch/loss/dft.py`); the range's
0.19 end has no such key, so the benchmark brings the same loss, as the trainer's
`compute_loss_func`, on every version.
"""

import torch


def dft_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """-sg[p] log p summed over trained tokens, divided by the trainer's `num_items_in_batch`
    (as its own loss is)."""
    targets = labels[:, 1:].to(outputs.logits.device)
    trained = targets != -100
    log_p = (
        outputs.logits[:, :-1][trained]
        .float()
        .log_softmax(-1)
        .gather(-1, targets[trained].unsqueeze(-1))
        .squeeze(-1)
    )
    count = num_items_in_batch if num_items_in_batch is not None else trained.sum().clamp(min=1)
    return -(log_p.exp().detach() * log_p).sum() / count
