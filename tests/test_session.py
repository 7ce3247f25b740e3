"""The training session: runs one after another on one loaded model, each training exactly what
it names and leaving the base weights as they were."""

import pytest
import torch
from peft import LoraConfig

from cofitune_plugin.session import Session, exact_patterns
from helpers import recipe, write_recipe

pytestmark = pytest.mark.axolotl


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_models, one_thread) -> Session:
    tmp_path = tmp_path_factory.mktemp("session")
    cfg = recipe(tmp_path, tiny_models["llama"], max_steps=2)
    return Session(write_recipe(tmp_path, cfg), save_strategy="no")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("restore", ["memory", "checkpoint"])
def test_a_selection_trains_then_the_base_weights_come_back(session, restore):
    base = _weights(session.model)
    names = list(session.select("25%-50%", "ffn").parameters)

    def changed(model) -> set[str]:
        return {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}

    run = session.train(exact_patterns(names), changed, {"learning_rate": 1e-2}, restore=restore)

    assert run.evaluation == set(names)  # evaluated on the trained weights, only those trained
    assert run.trainable == sum(base[n].numel() for n in names)
    assert run.output.global_step == 2 and run.train_seconds > 0
    assert all(torch.equal(p, base[n]) for n, p in session.model.named_parameters())


def test_a_peft_run_trains_adapters_and_unloads_them(session):
    base = _weights(session.model)
    config = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear")

    def adapters(model) -> int:
        return sum(1 for n, _ in model.named_parameters() if "lora_" in n)

    run = session.train(config, adapters, {"adapter": "lora", "cofitune": None, "seed": 1})

    assert run.evaluation > 0
    assert not any("lora_" in n for n, _ in session.model.named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in session.model.named_parameters())


def test_a_run_can_bring_its_own_optimizer_which_the_schedule_drives(session):
    """An optimizer the config cannot name (MoFO in the forgetting benchmark): the trainer uses
    it, with the config's learning-rate schedule, instead of building its own."""
    base = _weights(session.model)
    names = list(session.select("25%-50%", "ffn").parameters)
    built = []

    def frozen_sgd(model):
        built.append(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
        return built[-1]

    def changed(model) -> int:
        return sum(not torch.equal(p, base[n]) for n, p in model.named_parameters())

    run = session.train(
        exact_patterns(names), changed, {"learning_rate": 1e-2}, optimizer=frozen_sgd
    )
    assert run.evaluation == 0  # the rate-0 SGD moved nothing: the trainer's AdamW never ran
    assert len(built) == 1 and built[0].state_dict()["param_groups"][0]["initial_lr"] == 0.0


def test_a_run_can_bring_its_own_loss_which_the_trainer_minimises(session):
    """A loss the config cannot name (SFT with a KL term in the forgetting benchmark): the trainer
    calls it with the model's outputs and the labels, and its value is what the run reports."""
    names = list(session.select("25%-50%", "ffn").parameters)
    calls = []

    def doubled_cross_entropy(outputs, labels, num_items_in_batch=None):
        calls.append(labels.shape)
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        return 2 * torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
        )

    plain = session.train(exact_patterns(names), lambda model: None, {"learning_rate": 0.0})
    doubled = session.train(
        exact_patterns(names),
        lambda model: None,
        {"learning_rate": 0.0},
        loss=doubled_cross_entropy,
    )
    assert len(calls) == 2  # one per step
    assert doubled.output.training_loss == pytest.approx(2 * plain.output.training_loss, rel=1e-4)
