"""Importance on tiny models, for every estimator: shapes, exact zeros for cut units, larger
scores for louder units, no side effects, and the same importance whether one process or two
gloo ranks compute it."""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cofitune_plugin.architectures import architecture_for
from cofitune_plugin.importance import (
    ESTIMATORS,
    ImportanceError,
    Partitioned,
    RawImportance,
    compute_importance,
)
from cofitune_plugin.softmask import normalize
from helpers import VOCAB_SIZE, tiny_model

LAYER_PREFIX = {"gpt_neox": "gpt_neox.layers"}


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of random ids: row 1 keeps 10 of its 16 tokens."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB_SIZE, (3, 16), generator=generator)
        mask = torch.ones_like(ids)
        ids[1, 10:], mask[1, 10:] = 0, 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def importance_of(model, model_type: str, data=None, estimator: str = "das") -> RawImportance:
    return compute_importance(
        model,
        batches() if data is None else data,
        architecture_for(model_type),
        LAYER_PREFIX.get(model_type, "model.layers"),
        estimator=estimator,
        progress=False,
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("training", [False, True])
def test_llama_importance_is_nonzero_deterministic_and_leaves_the_model_untouched(
    estimator, training
):
    model = tiny_model("llama")
    model.train(training)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    raw = importance_of(model, "llama", estimator=estimator)
    again = importance_of(model, "llama", estimator=estimator)

    assert raw.head.shape == (8, 4)
    assert raw.intermediate.shape == (8, 64)
    assert raw.output.shape == (8, 32)
    assert raw.tokens == 2 * (3 * 16 - 6)
    assert raw.estimator == estimator
    for name, tensor in raw.tensors().items():
        assert tensor.dtype == torch.float32
        assert (tensor != 0).any(dim=1).all(), f"{name}: a layer has no signal"
        assert torch.equal(tensor, again.tensors()[name])
        if estimator != "das":  # squared gradients and energies
            assert (tensor >= 0).all(), name
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
        assert param.requires_grad == flags[name], name
    assert model.training == training
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def cut_units(model) -> None:
    """Head 1 of layer 3, neuron 5 of layer 2 and output dimension 7 of layer 4 write nothing:
    the weights that carry their output are zero."""
    head_dim = 8
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight[:, 1 * head_dim : 2 * head_dim] = 0
        model.model.layers[2].mlp.down_proj.weight[:, 5] = 0
        model.model.layers[4].mlp.down_proj.weight[7, :] = 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_unit_whose_output_is_zeroed_scores_exactly_zero(estimator):
    model = tiny_model("llama")
    cut_units(model)

    raw = importance_of(model, "llama", estimator=estimator)

    for row, unit, count in (
        (raw.head[3], 1, 4),
        (raw.intermediate[2], 5, 64),
        (raw.output[4], 7, 32),
    ):
        assert row[unit] == 0
        assert (row != 0).sum() == count - 1


def test_das_normalises_a_cut_unit_by_its_layer():
    model = tiny_model("llama")
    cut_units(model)
    raw = importance_of(model, "llama")
    for row, unit in ((raw.head[3], 1), (raw.intermediate[2], 5)):
        zero_score = torch.tanh((0 - row.mean()) / row.std()).abs()
        assert normalize(row[None])[0, unit] == zero_score
    # rank normalisation puts a cut unit of a non-negative estimator last in its layer
    fisher = importance_of(model, "llama", estimator="fisher")
    assert normalize(fisher.intermediate, "rank")[2, 5] == 0


@pytest.mark.parametrize("estimator", ["fisher", "activation"])
def test_louder_output_weights_raise_a_units_score(estimator):
    """Scaling up the weights a unit writes through (a head's columns of the output projection,
    a neuron's column of the down projection, an output dimension's row of it) raises its score
    and its rank in its layer."""
    plain = importance_of(tiny_model("llama"), "llama", estimator=estimator)
    model = tiny_model("llama")
    head_dim = 8
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight[:, 2 * head_dim : 3 * head_dim] *= 4
        model.model.layers[2].mlp.down_proj.weight[:, 9] *= 4
        model.model.layers[4].mlp.down_proj.weight[11, :] *= 4
    louder = importance_of(model, "llama", estimator=estimator)
    for unit, layer, index in (("head", 3, 2), ("intermediate", 2, 9), ("output", 4, 11)):
        before, after = getattr(plain, unit)[layer], getattr(louder, unit)[layer]
        assert after[index] > before[index], unit
        assert normalize(after[None], "rank")[0, index] >= normalize(before[None], "rank")[0, index]


def test_unknown_estimator_is_refused():
    with pytest.raises(ImportanceError, match="unknown importance estimator 'magnitude'"):
        importance_of(tiny_model("llama"), "llama", estimator="magnitude")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("model_type", ["gpt_neox", "phi3", "qwen2"])
def test_other_architectures(model_type, estimator):
    raw = importance_of(tiny_model(model_type), model_type, data=batches(n=1), estimator=estimator)
    assert raw.head.shape == (8, 4)
    assert raw.intermediate.shape == (8, 64)
    assert raw.output.shape == (8, 32)
    for tensor in raw.tensors().values():
        assert (tensor != 0).any(dim=1).all()


def test_moe_is_refused_naming_the_model_type():
    with pytest.raises(ImportanceError, match="model_type 'mixtral'"):
        importance_of(tiny_model("mixtral"), "mixtral")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_distributed_path_all_reduces(tmp_path, estimator):
    """A one-rank gloo group runs the all-reduce path; its sums equal the local ones."""
    model = tiny_model("qwen2")
    local = importance_of(model, "qwen2", data=batches(n=1), estimator=estimator)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        reduced = importance_of(model, "qwen2", data=batches(n=1), estimator=estimator)
    finally:
        dist.destroy_process_group()
    assert reduced.tokens == local.tokens
    for name, tensor in local.tensors().items():
        assert torch.equal(tensor, reduced.tensors()[name])


def test_a_batch_draws_its_noise_whatever_runs_before_it_and_the_callers_rng_is_kept():
    """Batch k's noise is seeded by (seed, k): a batch's contribution is the same whether the
    batch before it is run (`[a, b]`) or skipped (an all-padding batch of another shape, which
    would draw nothing from a shared RNG stream), and the caller's RNG state neither matters
    nor changes. Tolerance: float32 rounding of one sum of two contributions."""
    model = tiny_model("llama")
    a, b = batches(n=2)
    pad = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    pad["attention_mask"] = torch.zeros_like(pad["input_ids"])

    torch.manual_seed(1)
    state = torch.get_rng_state()
    both = importance_of(model, "llama", data=[a, b])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    only_a = importance_of(model, "llama", data=[a, pad])
    only_b = importance_of(model, "llama", data=[pad, b])

    assert both.tokens == only_a.tokens + only_b.tokens
    for name, tensor in both.tensors().items():
        summed = only_a.tensors()[name] * only_a.tokens + only_b.tensors()[name] * only_b.tokens
        torch.testing.assert_close(
            tensor, summed / both.tokens, rtol=1e-5, atol=1e-6 * tensor.abs().max()
        )


def test_gradient_checkpointing_replays_the_same_noise():
    """Non-reentrant checkpointing recomputes each layer in the backward, noise included: the
    result is the same as without it (a noise source it does not replay would give another)."""
    model = tiny_model("llama")
    plain = importance_of(model, "llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = importance_of(model, "llama")
    for name, tensor in plain.tensors().items():
        assert torch.equal(tensor, checkpointed.tensors()[name]), name


def _importance_on_rank(
    rank: int, rendezvous: str, data: list, out: str, estimator: str, lockstep: bool
) -> None:
    """One of two gloo ranks: the whole tiny llama, the same global batches; with `lockstep`,
    as if its weights were partitioned (a stand-in `Partitioned` that gathers nothing and
    counts the releases). Each rank saves what it computed and how many forwards it ran."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    model = tiny_model("llama")
    forwards, released = [], []
    model.register_forward_hook(lambda *_: forwards.append(rank))
    partitioned = Partitioned(lambda params: nullcontext(), lambda: released.append(rank))
    try:
        raw = compute_importance(
            model,
            data,
            architecture_for("llama"),
            "model.layers",
            estimator=estimator,
            progress=False,
            partitioned=partitioned if lockstep else None,
        )
    finally:
        dist.destroy_process_group()
    counts = {"forwards": len(forwards), "released": len(released)}
    torch.save({**raw.tensors(), "tokens": raw.tokens, **counts}, f"{out}.{rank}")


@pytest.mark.parametrize("lockstep", [False, True], ids=["whole", "partitioned"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_gloo_ranks_compute_the_one_process_importance(tmp_path, estimator, lockstep):
    """3 batches on 2 ranks (rank 0 takes batches 0 and 2, rank 1 batch 1): the same token
    count and the same tensors as one process, within float32 rounding of the sums, whose
    order differs ((b0 + b2) + b1 against (b0 + b1) + b2): rtol 1e-5, and atol 1e-6 of the
    tensor's largest element for sums that cancel to near zero. With partitioned weights
    every forward is collective: rank 1 runs a second pass, over a batch with no token
    counted, so both ranks run as many forwards, and release the gathered weights after each."""
    data = batches(n=3)
    out = tmp_path / "ranks.pt"
    rendezvous = str(tmp_path / "rendezvous")
    mp.spawn(_importance_on_rank, args=(rendezvous, data, str(out), estimator, lockstep), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    per_pass = 2 if estimator == "das" else 1
    passes = [2, 2] if lockstep else [2, 1]
    assert [r.pop("forwards") for r in ranks] == [n * per_pass for n in passes]
    assert [r.pop("released") for r in ranks] == (passes if lockstep else [0, 0])
    one = importance_of(tiny_model("llama"), "llama", data=data, estimator=estimator)
    for rank in ranks:
        assert rank.pop("tokens") == one.tokens
        for name, tensor in one.tensors().items():
            torch.testing.assert_close(
                rank[name], tensor, rtol=1e-5, atol=1e-6 * tensor.abs().max().item()
            )
