"""DAS importance on tiny models: shapes, exact zeros for cut units, no side effects, storage."""

import json

import pytest
import torch
import torch.distributed as dist

from cofitune_plugin.architectures import architecture_for
from cofitune_plugin.importance import (
    ImportanceError,
    RawImportance,
    compute_importance,
    data_fingerprint,
    load_importance,
    model_fingerprint,
    model_manifest,
    normalize,
    save_importance,
)
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


def importance_of(model, model_type: str, data=None, seed: int = 0) -> RawImportance:
    torch.manual_seed(seed)
    return compute_importance(
        model,
        batches() if data is None else data,
        architecture_for(model_type),
        LAYER_PREFIX.get(model_type, "model.layers"),
        progress=False,
    )


def manifest_of(model, model_type: str) -> dict:
    return model_manifest(
        model, architecture_for(model_type), LAYER_PREFIX.get(model_type, "model.layers")
    )


def fake_raw(seed: int, tokens: int = 10) -> RawImportance:
    generator = torch.Generator().manual_seed(seed)
    return RawImportance(
        head=torch.randn(8, 4, generator=generator),
        intermediate=torch.randn(8, 64, generator=generator),
        output=torch.randn(8, 32, generator=generator),
        tokens=tokens,
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


def test_normalize_is_per_row_zscore_then_abs_tanh():
    raw = torch.tensor([[1.0, 2.0, 3.0, 10.0], [-5.0, 0.0, 0.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    normalized = normalize(raw)
    for row, expected_row in zip(raw[:2], normalized[:2]):
        z = (row - row.mean()) / row.std()
        torch.testing.assert_close(expected_row, torch.tanh(z).abs())
    assert torch.equal(normalized[2], torch.zeros(4))
    big = normalize(torch.randn(8, 64) * 1e3)
    assert (big >= 0).all() and (big < 1).all()


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama")
    manifest = manifest_of(model, "llama")
    raw = fake_raw(seed=0)
    save_importance(raw, tmp_path / "run", {**manifest, "model": "tiny", "dropout": 0.003})

    written = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert written["tokens"] == 10 and written["model"] == "tiny"
    assert written["shapes"] == {"head": [8, 4], "intermediate": [8, 64], "output": [8, 32]}
    assert written["plugin_version"] == "0.1.0"
    loaded = load_importance([tmp_path / "run"], expected=manifest)
    assert torch.equal(loaded.head, normalize(raw.head))
    assert torch.equal(loaded.intermediate, normalize(raw.intermediate))
    assert torch.equal(loaded.output, normalize(raw.output))


def test_two_runs_combine_by_elementwise_max(tmp_path):
    manifest = manifest_of(tiny_model("llama"), "llama")
    first, second = fake_raw(seed=1), fake_raw(seed=2)
    save_importance(first, tmp_path / "a", manifest)
    save_importance(second, tmp_path / "b", manifest)
    combined = load_importance([tmp_path / "a", tmp_path / "b"], expected=manifest)
    for name in ("head", "intermediate", "output"):
        expected = torch.maximum(normalize(getattr(first, name)), normalize(getattr(second, name)))
        assert torch.equal(getattr(combined, name), expected)


@pytest.mark.parametrize("field", ["num_layers", "fingerprint"])
def test_a_manifest_mismatch_is_refused_naming_the_field(tmp_path, field):
    model = tiny_model("llama")
    manifest = manifest_of(model, "llama")
    save_importance(fake_raw(seed=0), tmp_path / "run", manifest)
    if field == "num_layers":
        expected = {**manifest, "num_layers": 30}
    else:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(1.0)
        expected = manifest_of(model, "llama")
    with pytest.raises(ImportanceError, match=field) as err:
        load_importance([tmp_path / "run"], expected=expected)
    assert repr(manifest[field]) in str(err.value)
    assert repr(expected[field]) in str(err.value)
    assert "axolotl cofitune-importance" in str(err.value)


def test_a_missing_manifest_is_refused(tmp_path):
    with pytest.raises(ImportanceError, match="has no manifest.json"):
        load_importance([tmp_path], expected={"model_type": "llama"})


def test_an_existing_importance_is_not_overwritten(tmp_path):
    manifest = {"model_type": "llama"}
    save_importance(fake_raw(seed=0), tmp_path, manifest)
    with pytest.raises(FileExistsError, match="already holds an importance"):
        save_importance(fake_raw(seed=1), tmp_path, manifest)
    save_importance(fake_raw(seed=1), tmp_path, manifest, overwrite=True)
    loaded = load_importance([tmp_path], expected=manifest)
    assert torch.equal(loaded.head, normalize(fake_raw(seed=1).head))


def test_save_refuses_a_manifest_that_contradicts_the_tensors(tmp_path):
    with pytest.raises(ValueError, match="num_layers"):
        save_importance(fake_raw(seed=0), tmp_path, {"num_layers": 30})


def test_model_fingerprint_follows_the_weights_not_their_dtype():
    model = tiny_model("llama")
    fingerprint = model_fingerprint(model)
    assert model_fingerprint(tiny_model("llama")) == fingerprint
    assert model_fingerprint(model.to(torch.bfloat16)) == fingerprint
    assert model_fingerprint(tiny_model("llama", seed=1)) != fingerprint


def test_data_fingerprint_ignores_padding_but_not_tokens():
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    fingerprint = data_fingerprint([{"input_ids": ids, "attention_mask": mask}])
    assert data_fingerprint([[5, 6, 7], [8, 9, 10, 11, 12]]) == fingerprint
    assert data_fingerprint([ids[:1, :3], ids[1]]) == fingerprint
    assert data_fingerprint([[5, 6, 7], [8, 9, 10, 11, 13]]) != fingerprint
    assert data_fingerprint([[5, 6], [7, 8, 9, 10, 11, 12]]) != fingerprint
