"""Soft masks on tiny models: row layouts per architecture, and exact effects on optimizer steps
(SGD gradient masks, AdamW update masks, gradient accumulation, DDP on two CPU processes)."""

import gc
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from cofitune_plugin.selection import Selection, select
from cofitune_plugin.softmask import (
    NormalizedImportance,
    SoftMask,
    SoftMaskError,
    normalize,
    row_masks,
)
from helpers import VOCAB_SIZE, tiny_model

N_HEADS, N_KV_HEADS, HEAD_DIM, D_FF, D_MODEL = 4, 2, 8, 64, 32
# Exactness checks run in float64: float32 cannot resolve a small change of a larger weight.
TIGHT = {"rtol": 1e-9, "atol": 1e-15}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model_in(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_model(model_type).to(dtype)


def random_importance(seed: int = 0) -> NormalizedImportance:
    """Distinct values per unit, so that a wrong row-to-unit mapping cannot pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    return NormalizedImportance(
        head=torch.rand(8, N_HEADS, generator=generator) * 0.9,
        intermediate=torch.rand(8, D_FF, generator=generator) * 0.9,
        output=torch.rand(8, D_MODEL, generator=generator) * 0.9,
    )


def selected(model, modules=("ffn", "mha")) -> Selection:
    """Layers 2-3 (25%-50% of 8); everything else frozen, as Axolotl would leave it."""
    selection = select(model, "25%-50%", list(modules))
    for name, param in model.named_parameters():
        param.requires_grad_(name in selection.parameters)
    return selection


def masks_for(model, importance: NormalizedImportance) -> dict[str, torch.Tensor]:
    selection = selected(model)
    return row_masks(model, selection, importance)


def expected_row_factor(model_type: str, path: str, layer: int, imp, row: int) -> float:
    """1 - I of the unit that row `row` of `path` produces, written out row by row from the
    modeling code of each architecture (independent of softmask.py's vectorised version)."""
    heads, neurons, outputs = imp.head[layer], imp.intermediate[layer], imp.output[layer]
    group = N_HEADS // N_KV_HEADS

    def kv_head(kv: int) -> float:
        return 1 - float(heads[kv * group : (kv + 1) * group].max())

    module = path.rsplit(".", 2)[-2]
    if module in ("up_proj", "dense_h_to_4h"):
        return 1 - float(neurons[row])
    if module == "gate_up_proj":  # rows [gate; up], both indexed by neuron
        return 1 - float(neurons[row % D_FF])
    if module in ("down_proj", "dense_4h_to_h"):
        return 1 - float(outputs[row])
    if module == "q_proj":
        return 1 - float(heads[row // HEAD_DIM])
    if module in ("k_proj", "v_proj"):
        return kv_head(row // HEAD_DIM)
    if module == "qkv_proj":  # [q (4 heads); k (2 heads); v (2 heads)]
        q_rows, kv_rows = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM
        if row < q_rows:
            return 1 - float(heads[row // HEAD_DIM])
        return kv_head(((row - q_rows) % kv_rows) // HEAD_DIM)
    if module == "query_key_value":  # per head [q_h; k_h; v_h]
        return 1 - float(heads[row // (3 * HEAD_DIM)])
    raise AssertionError(path)


def expected_masks(model, model_type: str, imp) -> dict[str, torch.Tensor]:
    selection = selected(model)
    out = {}
    for name in selection.parameters:
        layer = int(name.removeprefix(selection.layer_prefix + ".").split(".")[0])
        rows = model.get_parameter(name).shape[0]
        out[name] = torch.tensor(
            [expected_row_factor(model_type, name, layer, imp, r) for r in range(rows)]
        )
    return out


def rows_view(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (param.dim() - 1))


def token_batch(rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (rows, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def split(batch: dict[str, torch.Tensor], part: int, parts: int) -> dict[str, torch.Tensor]:
    return {key: value.chunk(parts)[part] for key, value in batch.items()}


def snapshot(model, names) -> dict[str, torch.Tensor]:
    return {name: model.get_parameter(name).detach().clone() for name in names}


def sgd_step(model, batch) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()


PAPER_MODULES = {
    "llama": ["model.layers.2.mlp.up_proj.weight", "model.layers.3.self_attn.k_proj.weight"],
    "phi3": ["model.layers.2.mlp.gate_up_proj.weight", "model.layers.3.self_attn.qkv_proj.weight"],
    "gpt_neox": [
        "gpt_neox.layers.2.attention.query_key_value.weight",
        "gpt_neox.layers.2.attention.query_key_value.bias",
        "gpt_neox.layers.3.mlp.dense_4h_to_h.bias",
    ],
}


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt_neox"])
def test_row_masks_follow_each_layout(model_type):
    model, imp = tiny_model_in(model_type), random_importance()
    masks = masks_for(model, imp)
    expected = expected_masks(model, model_type, imp)
    assert masks.keys() == expected.keys()
    assert set(PAPER_MODULES[model_type]) <= masks.keys()
    for name, mask in masks.items():
        assert mask.dtype == torch.float32
        torch.testing.assert_close(mask, expected[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("model_type", "attention", "qkv", "heads_hit"),
    [
        ("llama", "self_attn", ("q_proj", "k_proj", "v_proj"), {0, 1}),
        ("phi3", "self_attn", ("qkv_proj",), {0, 1}),
        ("gpt_neox", "attention", ("query_key_value",), {1}),
    ],
)
def test_masked_rows_feed_the_head_they_are_named_after(model_type, attention, qkv, heads_hit):
    """Perturbing the rows masked for head 1 changes head 1's output (and, with GQA, its group
    partner's through the shared key/value head); perturbing every other row leaves head 1 alone.
    This checks the row layouts against the modeling code itself."""
    model = tiny_model_in(model_type)
    layers = model.get_submodule("gpt_neox.layers" if model_type == "gpt_neox" else "model.layers")
    imp = NormalizedImportance(
        head=torch.zeros(8, N_HEADS), intermediate=torch.zeros(8, D_FF), output=torch.zeros(8, 32)
    )
    imp.head[2, 1] = 0.5
    masks = masks_for(model, imp)
    attention_module = layers[2].get_submodule(attention)
    out_proj = attention_module.get_submodule("o_proj" if model_type != "gpt_neox" else "dense")
    seen = []
    out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    batch = token_batch(rows=2)

    def heads_changed(perturb_masked_rows: bool) -> set[int]:
        seen.clear()
        model(input_ids=batch["input_ids"])
        originals = {}
        with torch.no_grad():
            for module in qkv:
                for kind in ("weight", "bias"):
                    param = getattr(attention_module.get_submodule(module), kind, None)
                    if param is None:
                        continue
                    name = next(n for n, p in model.named_parameters() if p is param)
                    rows = (masks[name] < 1) == perturb_masked_rows
                    originals[name] = param.clone()
                    param[rows] += 1.0
            model(input_ids=batch["input_ids"])
            for name, original in originals.items():
                model.get_parameter(name).copy_(original)
        before, after = (x.unflatten(-1, (N_HEADS, HEAD_DIM)) for x in seen)
        return {h for h in range(N_HEADS) if not torch.equal(before[..., h, :], after[..., h, :])}

    assert heads_changed(perturb_masked_rows=True) == heads_hit
    assert 1 not in heads_changed(perturb_masked_rows=False)


def test_raw_modules_are_refused_naming_the_parameter():
    model = tiny_model_in("llama")
    selection = selected(model, modules=("ffn", "o_proj"))
    with pytest.raises(SoftMaskError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight"):
        row_masks(model, selection, random_importance())


def test_moe_is_refused():
    model = tiny_model_in("mixtral")
    selection = selected(model, modules=("ffn",))
    with pytest.raises(SoftMaskError, match="'mixtral'"):
        row_masks(model, selection, random_importance())


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt_neox"])
def test_sgd_gradient_mask_scales_each_row_change(model_type):
    imp = random_importance()
    masked, plain = (
        tiny_model_in(model_type, torch.float64),
        tiny_model_in(model_type, torch.float64),
    )
    expected = expected_masks(plain, model_type, imp)
    soft_mask = SoftMask(masked, masks_for(masked, imp), "gradient")
    start = snapshot(plain, expected)
    batch = token_batch()

    sgd_step(masked, batch)
    sgd_step(plain, batch)

    for name, keep in expected.items():
        plain_change = plain.get_parameter(name).detach() - start[name]
        masked_change = masked.get_parameter(name).detach() - start[name]
        assert plain_change.abs().amax() > 0, name
        torch.testing.assert_close(
            masked_change, rows_view(keep.double(), plain_change) * plain_change, **TIGHT
        )
    soft_mask.remove()


def test_adamw_update_mask_keeps_mask_times_the_change_over_two_steps():
    imp = random_importance()
    masked, reference = tiny_model_in("llama", torch.float64), tiny_model_in("llama", torch.float64)
    masks = masks_for(masked, imp)
    selected(reference)
    soft_mask = SoftMask(masked, masks, "update")

    def adamw(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    masked_optimizer, reference_optimizer = adamw(masked), adamw(reference)
    soft_mask.attach_optimizer(masked_optimizer)
    for step in range(2):
        batch = token_batch(seed=step)
        start = snapshot(reference, masks)
        for model, optimizer in ((masked, masked_optimizer), (reference, reference_optimizer)):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        for name, mask in masks.items():
            param = reference.get_parameter(name)
            plain_change = param.detach() - start[name]
            masked_change = masked.get_parameter(name).detach() - start[name]
            assert plain_change.abs().amax() > 0, name
            torch.testing.assert_close(
                masked_change, rows_view(mask.double(), param) * plain_change, **TIGHT
            )
            with torch.no_grad():  # the reference continues from the masked weights
                param.copy_(start[name] + rows_view(mask, param) * plain_change)
    soft_mask.remove()


def test_gradient_mask_with_accumulation_equals_one_big_batch():
    imp = random_importance()
    accumulated, whole = (
        tiny_model_in("llama", torch.float64),
        tiny_model_in("llama", torch.float64),
    )
    masks = masks_for(accumulated, imp)
    SoftMask(accumulated, masks, "gradient")
    SoftMask(whole, masks_for(whole, imp), "gradient")
    batch = token_batch(rows=4)

    optimizer = torch.optim.SGD([p for p in accumulated.parameters() if p.requires_grad], lr=0.5)
    for part in range(2):  # equal token counts: the mean of the two means is the overall mean
        (accumulated(**split(batch, part, 2)).loss / 2).backward()
    optimizer.step()
    sgd_step(whole, batch)

    for name in masks:
        torch.testing.assert_close(
            accumulated.get_parameter(name), whole.get_parameter(name), **TIGHT
        )


@pytest.mark.parametrize("apply_to", ["gradient", "update"])
def test_remove_restores_unmasked_training(apply_to):
    imp = random_importance()
    masked, plain = tiny_model_in("llama"), tiny_model_in("llama")
    soft_mask = SoftMask(masked, masks_for(masked, imp), apply_to)
    names = list(masks_for(plain, imp))
    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for model in (masked, plain)
    ]
    if apply_to == "update":
        soft_mask.attach_optimizer(optimizers[0])
    soft_mask.remove()
    for model, optimizer in zip((masked, plain), optimizers):
        model(**token_batch()).loss.backward()
        optimizer.step()
    for name in names:
        assert torch.equal(masked.get_parameter(name), plain.get_parameter(name))


@pytest.mark.parametrize("apply_to", ["gradient", "update"])
def test_fingerprint_is_the_same_for_the_same_factors_and_only_then(apply_to):
    """What a resumed run logs to show it binds the masks it bound before: equal for masks
    built again from the same importance, different when one row's factor differs."""
    imp = random_importance()
    model = tiny_model_in("llama")
    masks = masks_for(model, imp)
    first = SoftMask(model, masks, apply_to)
    again = SoftMask(model, masks_for(model, imp), apply_to)
    name = next(iter(masks))
    nudged = {**masks, name: masks[name].clone().index_fill_(0, torch.tensor([1]), 0.5)}
    other = SoftMask(model, nudged, apply_to)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    for soft_mask in (first, again, other):
        soft_mask.remove()


def train_two_steps(model, masks, apply_to: str, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Two masked optimizer steps; `model` may be wrapped in DDP."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    soft_mask = SoftMask(inner, masks, apply_to)
    params = [p for p in inner.parameters() if p.requires_grad]
    if apply_to == "gradient":
        optimizer = torch.optim.SGD(params, lr=0.5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        soft_mask.attach_optimizer(optimizer)
    for batch in batches:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return snapshot(inner, masks)


def ddp_run(apply_to: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's share of the batches through DDP; the DDP object dies when this returns."""
    model = tiny_model_in("llama", torch.float64)
    masks = masks_for(model, random_importance())
    batches = [split(token_batch(seed=s), rank, world_size) for s in range(2)]
    return train_two_steps(DistributedDataParallel(model), masks, apply_to, batches)


def ddp_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        for apply_to in ("gradient", "update"):
            result = ddp_run(apply_to, rank, world_size)
            if rank == 0:
                torch.save(result, out_dir / f"{apply_to}.pt")
        # Free every DDP reducer while the group is alive: a gloo group destroyed first can hang
        # in its destructor when the last reference goes later.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_two_processes_matches_one_process_on_the_full_batch(tmp_path):
    # fork: the workers inherit the imported modules instead of spending ~20 s importing them.
    workers = mp.start_processes(
        ddp_worker, args=(2, free_port(), tmp_path), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 120 s")
    for apply_to in ("gradient", "update"):
        model = tiny_model_in("llama", torch.float64)
        masks = masks_for(model, random_importance())
        single = train_two_steps(model, masks, apply_to, [token_batch(seed=s) for s in range(2)])
        distributed = torch.load(tmp_path / f"{apply_to}.pt")
        for name, value in single.items():
            torch.testing.assert_close(distributed[name], value, rtol=0, atol=1e-6, msg=name)


def test_normalize_is_per_row_zscore_then_abs_tanh():
    raw = torch.tensor([[1.0, 2.0, 3.0, 10.0], [-5.0, 0.0, 0.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    normalized = normalize(raw)
    for row, expected_row in zip(raw[:2], normalized[:2]):
        z = (row - row.mean()) / row.std()
        torch.testing.assert_close(expected_row, torch.tanh(z).abs())
    assert torch.equal(normalized[2], torch.zeros(4))
    big = normalize(torch.randn(8, 64) * 1e3)
    assert (big >= 0).all() and (big < 1).all()


def test_rank_normalisation_is_the_units_rank_in_its_layer_over_their_count():
    raw = torch.tensor([[3.0, 0.0, 1.0, 1.0], [4.0, 4.0, 4.0, 4.0], [0.5, 2e6, 1e-9, 7.0]])
    normalized = normalize(raw, "rank")
    assert torch.equal(normalized[0], torch.tensor([3.0, 0.0, 1.5, 1.5]) / 4)  # ties: mean rank
    assert torch.equal(normalized[1], torch.zeros(4))  # no ranking: no protection
    assert torch.equal(normalized[2], torch.tensor([1.0, 3.0, 0.0, 2.0]) / 4)  # scale-free
    scores = torch.rand(5, 100) ** 8  # heavy-tailed, non-negative
    ranked = normalize(scores, "rank")
    assert (ranked >= 0).all() and (ranked < 1).all()
    order = scores.argsort(dim=1)
    assert (ranked.gather(1, order).diff(dim=1) > 0).all()  # strictly monotone within a layer


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="unknown importance normalization 'minmax'"):
        normalize(torch.rand(2, 3), "minmax")
