"""SFT with a KL term to the base, the forgetting benchmark's regularised rival: the loss is the
model's own cross-entropy plus beta x KL(base || model) on the trained tokens, and it keeps a
trained model nearer the base than plain SFT at the same rate."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from kl import KLToBase  # noqa: E402

from helpers import VOCAB_SIZE, tiny_model  # noqa: E402


@pytest.fixture
def base() -> torch.nn.Module:
    return tiny_model("llama").eval()


def _batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt is not trained
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _loss(model, loss_func, batch) -> torch.Tensor:
    """As the trainer calls `compute_loss_func`: the model's forward without labels, then the
    loss from its outputs and the labels."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return loss_func(outputs, batch["labels"], num_items_in_batch=(batch["labels"] != -100).sum())


def test_against_an_identical_base_the_loss_is_the_models_own_cross_entropy(base):
    model = copy.deepcopy(base)
    batch = _batch()
    loss = _loss(model, KLToBase(model, base, beta=1.0), batch)
    assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_the_kl_term_is_beta_times_kl_from_the_base_on_the_trained_tokens(base):
    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = _batch()
    own = model(**batch).loss
    loss = _loss(model, KLToBase(model, base, beta=0.5), batch)
    with torch.no_grad():
        trained = batch["labels"][:, 1:] != -100
        log_p = base(input_ids=batch["input_ids"]).logits[:, :-1][trained].log_softmax(-1)
        log_q = model(input_ids=batch["input_ids"]).logits[:, :-1][trained].log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum() / trained.sum()
    assert kl > 0.01
    assert loss.item() == pytest.approx(own.item() + 0.5 * kl.item(), rel=1e-4)


def test_it_keeps_a_trained_model_nearer_the_base_than_plain_sft(base):
    batch = _batch()

    def kl_from_base_after_training(beta: float) -> float:
        model = copy.deepcopy(base).train().requires_grad_(True)
        loss_func = KLToBase(model, base, beta=beta)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(20):
            optimizer.zero_grad()
            _loss(model, loss_func, batch).backward()
            optimizer.step()
        loss_func.remove()
        return (
            _loss(model.eval(), KLToBase(model, base, beta=1.0), batch) - model(**batch).loss
        ).item()

    assert kl_from_base_after_training(beta=5.0) < 0.5 * kl_from_base_after_training(beta=0.0)


def test_removed_it_keeps_no_inputs_of_later_forwards(base):
    model = copy.deepcopy(base)
    loss_func = KLToBase(model, base)
    batch = _batch()
    _loss(model, loss_func, batch)
    loss_func.remove()
    model(input_ids=batch["input_ids"])
    assert loss_func._inputs == {}
