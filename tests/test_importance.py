"""DAS importance on tiny models: shapes, exact zeros for cut units, no side effects, and the
same importance whether one process or two gloo ranks compute it."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cofitune_plugin.architectures import architecture_for
from cofitune_plugin.importance import ImportanceError, RawImportance, compute_importance
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


def importance_of(model, model_type: str, data=None) -> RawImportance:
    return compute_importance(
        model,
        batches() if data is None else data,
        architecture_for(model_type),
        LAYER_PREFIX.get(model_type, "model.layers"),
        progress=False,
    )


def test_llama_importance_is_nonzero_deterministic_and_leaves_the_model_untouched():
    model = tiny_model("llama")
    model.eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    raw = importance_of(model, "llama")
    again = importance_of(model, "llama")

    assert raw.head.shape == (8, 4)
    assert raw.intermediate.shape == (8, 64)
    assert raw.output.shape == (8, 32)
    assert raw.tokens == 2 * (3 * 16 - 6)
    for name, tensor in raw.tensors().items():
        assert tensor.dtype == torch.float32
        assert (tensor != 0).any(dim=1).all(), f"{name}: a layer has no signal"
        assert torch.equal(tensor, again.tensors()[name])
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
        assert param.requires_grad == flags[name], name
    assert not model.training
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_a_cut_head_and_a_cut_neuron_get_exactly_zero_gradient():
    model = tiny_model("llama")
    head_dim = 8
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight[:, 1 * head_dim : 2 * head_dim] = 0
        model.model.layers[2].mlp.down_proj.weight[:, 5] = 0

    raw = importance_of(model, "llama")

    assert raw.head[3, 1] == 0 and (raw.head[3] != 0).sum() == 3
    assert raw.intermediate[2, 5] == 0 and (raw.intermediate[2] != 0).sum() == 63
    for row, unit in ((raw.head[3], 1), (raw.intermediate[2], 5)):
        zero_score = torch.tanh((0 - row.mean()) / row.std()).abs()
        assert normalize(row[None])[0, unit] == zero_score


@pytest.mark.parametrize("model_type", ["gpt_neox", "phi3", "qwen2"])
def test_other_architectures(model_type):
    raw = importance_of(tiny_model(model_type), model_type, data=batches(n=1))
    assert raw.head.shape == (8, 4)
    assert raw.intermediate.shape == (8, 64)
    assert raw.output.shape == (8, 32)
    for tensor in raw.tensors().values():
        assert (tensor != 0).any(dim=1).all()


def test_moe_is_refused_naming_the_model_type():
    with pytest.raises(ImportanceError, match="model_type 'mixtral'"):
        importance_of(tiny_model("mixtral"), "mixtral")


def test_distributed_path_all_reduces(tmp_path):
    """A one-rank gloo group runs the all-reduce path; its sums equal the local ones."""
    model = tiny_model("qwen2")
    local = importance_of(model, "qwen2", data=batches(n=1))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        reduced = importance_of(model, "qwen2", data=batches(n=1))
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


def _importance_on_rank(rank: int, rendezvous: str, data: list, out: str) -> None:
    """One of two gloo ranks: the whole tiny llama, the same global batches; rank 0 saves."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        raw = importance_of(tiny_model("llama"), "llama", data=data)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save({**raw.tensors(), "tokens": raw.tokens}, out)


def test_two_gloo_ranks_compute_the_one_process_importance(tmp_path):
    """3 batches on 2 ranks (rank 0 takes batches 0 and 2, rank 1 batch 1): the same token
    count and the same tensors as one process, within float32 rounding of the sums, whose
    order differs ((b0 + b2) + b1 against (b0 + b1) + b2): rtol 1e-5, and atol 1e-6 of the
    tensor's largest element for sums that cancel to near zero."""
    data = batches(n=3)
    out = tmp_path / "ranks.pt"
    mp.spawn(_importance_on_rank, args=(str(tmp_path / "rendezvous"), data, str(out)), nprocs=2)
    ranks = torch.load(out)
    one = importance_of(tiny_model("llama"), "llama", data=data)
    assert ranks.pop("tokens") == one.tokens
    for name, tensor in one.tensors().items():
        torch.testing.assert_close(
            ranks[name], tensor, rtol=1e-5, atol=1e-6 * tensor.abs().max().item()
        )
