"""How much a model's general ability relies on each unit: heads, FFN neurons, FFN outputs.

CoFiTune's fine level (after DAS, Ke et al. ICLR 2023) protects the units a model's versatility
depends on. Their importance is measured once, before training, without labels: all-ones virtual
gates are attached to every head output, FFN intermediate neuron and FFN output dimension, each
batch runs twice in train mode with a little dropout noise injected, and the gradient of the KL
divergence between the two passes with respect to each gate says how much that unit moves the
output distribution. The gates are forward hooks, so any supported Hugging Face model works
unmodified.

A batch's contribution depends on the batch alone, not on which process computes it nor on how
many there are: its dropout noise is drawn after seeding from (seed, the batch's index in the
data), not from whatever state the RNG was left in by what ran before. So ranks that split the
batches between them and sum what they got give one process's importance, up to the order of
float additions. Under a multi-process launcher every rank lays out the same batches
(`global_batches`) and computes every world-size-th of them, each with the whole model.

This module is plain PyTorch and measures only: the CLI feeds it batches, and
`importance_store.py` stores what it returns; the rule that turns it into masks (normalise,
combine, 1 - I per row) is `softmask.py`'s.
"""

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from cofitune_plugin.architectures import Architecture

UNITS = ("head", "intermediate", "output")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The batch keys `compute_importance` feeds the model."""


class ImportanceError(ValueError):
    """Importance that cannot be computed for, or applied to, the model at hand."""


@dataclass
class RawImportance:
    """Signed gate gradients summed over the data and divided by its non-pad token count.

    `head` is [layers, query heads], `intermediate` [layers, d_ff], `output` [layers, d_model],
    all float32 on the CPU; `tokens` is the number of non-pad tokens (over all ranks) behind them.
    """

    head: Tensor
    intermediate: Tensor
    output: Tensor
    tokens: int

    def tensors(self) -> dict[str, Tensor]:
        return {"head": self.head, "intermediate": self.intermediate, "output": self.output}


@dataclass
class _HookedLayer:
    """One decoder layer's hook points and its virtual gates (float32 leaves)."""

    attn_out: nn.Module
    ffn_down: nn.Module
    head_gate: Tensor
    intermediate_gate: Tensor
    output_gate: Tensor


def global_batches(
    dataset: Any,
    collate_fn: Callable[[list[dict]], dict[str, Tensor]],
    batch_size: int,
    seed: int,
    max_batches: int | None = None,
) -> list[dict[str, Tensor]]:
    """The batches of an importance run, the same list on every rank: the model inputs of
    `dataset` (a `datasets.Dataset`) in an order drawn from `seed`, `batch_size` rows each,
    collated by `collate_fn`, the first `max_batches` of them.

    Not a trainer's dataloader: under several processes accelerate deals its batches to the
    ranks round-robin and pads the last round with repeated rows, so no rank would hold the
    batches of one process; `compute_importance` splits this list itself.
    """
    inputs = dataset.select_columns([c for c in MODEL_INPUTS if c in dataset.column_names])
    loader = DataLoader(
        inputs,
        batch_size=batch_size,
        sampler=RandomSampler(inputs, generator=torch.Generator().manual_seed(seed)),
        collate_fn=collate_fn,
    )
    return [dict(batch) for batch in itertools.islice(loader, max_batches)]


def compute_importance(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    architecture: Architecture,
    layer_prefix: str,
    dropout: float = 0.003,
    seed: int = 0,
    progress: bool = True,
) -> RawImportance:
    """Accumulate DAS importance of every head, FFN neuron and FFN output over `batches`.

    Each batch (`input_ids`, optional `attention_mask` and `position_ids`; other keys such as
    `labels` are ignored) runs twice in train mode. The loss is
    `F.kl_div(log_softmax(logits1), softmax(logits2), reduction="sum")` over the non-pad tokens,
    which is KL(p2 || p1) = sum p2 * (log p2 - log p1), the direction DAS's code uses; both passes
    stay in the graph. Only the gates are differentiated (`torch.autograd.grad`), and the weights
    are frozen for the pass so no activation is kept for a weight gradient: the model's
    parameters, their `.grad` and their `requires_grad` flags end as they started.

    The dropout noise (probability `dropout`) is injected on the head outputs (input of the
    attention output projection) and on the MLP output, because Hugging Face models have no
    dropout there: without it both passes agree and every gradient is zero. Batch k's noise is
    drawn with the global RNG freshly seeded from (`seed`, k), so it does not depend on what ran
    before; the caller's RNG state is restored afterwards. Not a private `torch.Generator`:
    gradient checkpointing replays only the global RNG when it recomputes a layer in the
    backward, and a private generator would draw other noise there than in the forward.

    Under torch.distributed every rank passes the same `batches` and runs batches rank,
    rank + world size, ... (`batch_share`); the sums and token counts are then all-reduced, so
    every rank returns the token-weighted mean over all batches, which equals one process's up
    to the order of float additions. Progress shows on rank 0 only. Gradient checkpointing must
    be off or non-reentrant (reentrant checkpointing hides the gates from `autograd.grad`).
    """
    layers = _hook_points(model, architecture, layer_prefix)
    n_heads = _text_config(model).num_attention_heads
    head_sums = [torch.zeros_like(layer.head_gate) for layer in layers]
    intermediate_sums = [torch.zeros_like(layer.intermediate_gate) for layer in layers]
    output_sums = [torch.zeros_like(layer.output_gate) for layer in layers]
    gates = [g for layer in layers for g in _gates(layer)]
    sums = [s for parts in zip(head_sums, intermediate_sums, output_sums) for s in parts]
    tokens = 0
    input_device = model.get_input_embeddings().weight.device

    handles = []
    was_training = model.training
    try:
        for layer in layers:
            handles.append(
                layer.attn_out.register_forward_pre_hook(
                    _gate_heads(layer.head_gate, n_heads, dropout)
                )
            )
            handles.append(
                layer.ffn_down.register_forward_pre_hook(_gate_input(layer.intermediate_gate))
            )
            handles.append(
                layer.ffn_down.register_forward_hook(_gate_output(layer.output_gate, dropout))
            )
        model.train()
        indices = batch_share(len(batches))
        shown = progress and indices.start == 0  # rank 0's only
        with _frozen(model), _forked_rng(model):
            for index in tqdm(indices, desc="cofitune importance", disable=not shown):
                inputs = _model_inputs(batches[index], input_device)
                keep = inputs["attention_mask"] != 0
                batch_tokens = int(keep.sum())
                if batch_tokens == 0:
                    continue
                torch.manual_seed(_batch_seed(seed, index))
                logits1 = model(**inputs, use_cache=False).logits[keep].float()
                logits2 = model(**inputs, use_cache=False).logits[keep].float()
                loss = F.kl_div(
                    F.log_softmax(logits1, dim=-1), F.softmax(logits2, dim=-1), reduction="sum"
                )
                for total, grad in zip(sums, torch.autograd.grad(loss, gates)):
                    total.add_(grad)
                tokens += batch_tokens
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    if _distributed():
        tokens = _all_reduce_sums(sums, tokens, input_device)
    if tokens == 0:
        raise ImportanceError("cofitune importance: the data held no non-pad token")
    return RawImportance(
        head=torch.stack([s.cpu() for s in head_sums]) / tokens,
        intermediate=torch.stack([s.cpu() for s in intermediate_sums]) / tokens,
        output=torch.stack([s.cpu() for s in output_sums]) / tokens,
        tokens=tokens,
    )


def batch_share(count: int) -> range:
    """The indices, among `count` global batches, of those this rank computes: every
    world-size-th from its rank under torch.distributed, else all of them."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    return range(rank, count, world_size)


def _dropout(x: Tensor, p: float) -> Tensor:
    """`x` with each element zeroed with probability p, the rest scaled by 1 / (1 - p)."""
    keep = torch.rand(x.shape, device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


def _batch_seed(seed: int, index: int) -> int:
    """A 63-bit seed for batch `index` of a run seeded with `seed`."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _forked_rng(model: nn.Module) -> Iterator[None]:
    """The global RNG of the CPU and of the model's accelerator devices, restored on exit."""
    devices = {p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}
    device_type = next(iter(devices)).type if devices else None
    with torch.random.fork_rng(devices=[d.index for d in devices], device_type=device_type):
        yield


def unit_counts(model: nn.Module, architecture: Architecture, layer_prefix: str) -> dict[str, int]:
    """The model's layers and units per layer, as `compute_importance` shapes its tensors."""
    layers = _hook_points(model, architecture, layer_prefix)
    return {
        "num_layers": len(layers),
        "n_heads": layers[0].head_gate.numel(),
        "d_ff": layers[0].intermediate_gate.numel(),
        "d_model": layers[0].output_gate.numel(),
    }


def _hook_points(
    model: nn.Module, architecture: Architecture, layer_prefix: str
) -> list[_HookedLayer]:
    """Each decoder layer's attention-output and down projections, with fresh all-ones gates."""
    config = _text_config(model)
    if architecture.attn_out is None or architecture.ffn_down is None:
        raise ImportanceError(
            f"cofitune: importance and soft masks are not supported for model_type "
            f"'{config.model_type}': its FFN experts are fused tensors with no down-projection "
            "module to attach gates to. Train it without `soft_mask`."
        )
    n_heads = config.num_attention_heads
    hooked = []
    for layer in model.get_submodule(layer_prefix):
        attn_out = layer.get_submodule(architecture.attn_out)
        ffn_down = layer.get_submodule(architecture.ffn_down)
        # in/out_features, not weight.shape: 4-bit weights are stored packed
        heads_width = attn_out.in_features
        if heads_width % n_heads:
            raise ImportanceError(
                f"cofitune: {architecture.attn_out} takes {heads_width} inputs, not a multiple "
                f"of num_attention_heads={n_heads}"
            )
        d_model, d_ff = ffn_down.out_features, ffn_down.in_features
        device = attn_out.weight.device
        hooked.append(
            _HookedLayer(
                attn_out=attn_out,
                ffn_down=ffn_down,
                head_gate=torch.ones(n_heads, device=device, requires_grad=True),
                intermediate_gate=torch.ones(
                    d_ff, device=ffn_down.weight.device, requires_grad=True
                ),
                output_gate=torch.ones(d_model, device=ffn_down.weight.device, requires_grad=True),
            )
        )
    return hooked


def _gates(layer: _HookedLayer) -> tuple[Tensor, Tensor, Tensor]:
    return layer.head_gate, layer.intermediate_gate, layer.output_gate


def _gate_heads(gate: Tensor, n_heads: int, dropout: float):
    """Pre-hook on the attention output projection: noise, then one gate per query head."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        heads = _dropout(args[0], dropout).unflatten(-1, (n_heads, -1))
        return ((heads * gate.to(heads.dtype)[:, None]).flatten(-2), *args[1:])

    return hook


def _gate_input(gate: Tensor):
    """Pre-hook on the down projection: one gate per intermediate neuron."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * gate.to(args[0].dtype), *args[1:])

    return hook


def _gate_output(gate: Tensor, dropout: float):
    """Forward hook on the down projection: noise on the MLP output, then one gate per dim."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return _dropout(output, dropout) * gate.to(output.dtype)

    return hook


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Turn off `requires_grad` on all parameters, and restore each flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids) if mask is None else mask.to(device),
    }
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"].to(device)
    return inputs


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sums(sums: list[Tensor], tokens: int, device: torch.device) -> int:
    """Sum the gate gradients and token counts of all ranks (one collective for the tensors)."""
    flat = torch.cat([s.to(device) for s in sums])
    dist.all_reduce(flat)
    for total, reduced in zip(sums, flat.split([s.numel() for s in sums])):
        total.copy_(reduced)
    count = torch.tensor([tokens], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    return int(count.item())


def _text_config(model: nn.Module) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    return model.config.get_text_config()
