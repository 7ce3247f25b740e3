"""The DFT loss, the forgetting benchmark's loss-weighting rival: each trained token's
cross-entropy weighted by its detached probability, so its gradient is that of -p(y_t)
(an unlikely token pulls less than under plain cross-entropy)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from dft import dft_loss  # noqa: E402

from helpers import VOCAB_SIZE, tiny_model  # noqa: E402


def _batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt is not trained
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _outputs(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_the_gradient_is_that_of_minus_each_trained_tokens_probability():
    model, batch = tiny_model("llama"), _batch()
    labels, count = batch["labels"], (batch["labels"] != -100).sum()
    dft_loss(_outputs(model, batch), labels, num_items_in_batch=count).backward()
    by_dft = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = _outputs(model, batch).logits[:, :-1]
    targets = labels[:, 1:]
    trained = targets != -100
    p = logits.softmax(-1)[trained].gather(-1, targets[trained].unsqueeze(-1))
    (-p.sum() / count).backward()
    for a, (name, param) in zip(by_dft, model.named_parameters(), strict=True):
        torch.testing.assert_close(a, param.grad, msg=name)


def test_its_value_is_each_tokens_cross_entropy_weighted_by_its_probability():
    model, batch = tiny_model("llama"), _batch()
    outputs = _outputs(model, batch)
    targets = batch["labels"][:, 1:]
    trained = targets != -100
    log_p = outputs.logits[:, :-1][trained].log_softmax(-1)
    log_p = log_p.gather(-1, targets[trained].unsqueeze(-1)).squeeze(-1)
    expected = (-(log_p.exp() * log_p)).mean()
    # without num_items_in_batch, it divides by the trained tokens itself
    assert dft_loss(outputs, batch["labels"]).item() == pytest.approx(expected.item(), rel=1e-5)
    # and is below the plain cross-entropy, every weight being under 1
    assert dft_loss(outputs, batch["labels"]).item() < model(**batch).loss.item()
