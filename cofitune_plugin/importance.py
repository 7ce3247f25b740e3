"""How much a model's general ability relies on each unit: heads, FFN neurons, FFN outputs.

CoFiTune's fine level protects the units a model's versatility depends on. Their importance is
measured once, before training, without labels, on general text, by one of three estimators
(`ESTIMATORS`), each a score per attention head (its output, before the output projection; with
GQA one per query head), per FFN intermediate neuron (the input of the down projection) and per
FFN output dimension (the down projection's output):

- `das` (the paper's, after DAS, Ke et al. ICLR 2023): all-ones virtual gates on the units, each
  batch run twice in train mode with a little dropout noise injected, and the *signed* gradient
  of the KL divergence between the two passes with respect to each gate. At gate = 1 the
  first-order term of that KL has zero mean, so the signed sum averages towards zero: what is
  left is mostly sampling noise (`benchmarks/importance_stability.py` measures how much).
- `fisher`: the gates' empirical Fisher information (Michel et al. 2019; Kwon et al. 2022): per
  token, the squared gradient of the text's own next-token NLL with respect to the unit's gate,
  summed over the tokens. Eval mode, no noise: one forward and one backward per batch.
- `activation`: forward only, as Wanda and FLAP rank units: the unit's activation energy (sum of
  squares over the tokens) times the squared norm of the weights it feeds (a head's columns of
  the output projection, a neuron's column of the down projection; an FFN output dimension feeds
  the residual stream directly, so its energy alone).

`fisher` and `activation` are non-negative, so they are normalised by rank (`NORMALIZATION`,
applied in `softmask.normalize`), not by the paper's |tanh(z-score)|, which would protect the
least important units as much as the most important ones.

A batch's contribution depends on the batch alone, not on which process computes it nor on how
many there are (`das` seeds its noise from (seed, the batch's index in the data)). So ranks that
split the batches between them and sum what they got give one process's importance, up to the
order of float additions. Under a multi-process launcher every rank lays out the same batches
(`global_batches`) and computes every world-size-th of them, with the whole model or, under
DeepSpeed ZeRO-3, with a model whose weights are partitioned over the ranks (`Partitioned`):
the engine's hooks gather each layer for the passes, as in training, and only the weight norms
of the `activation` estimator are gathered here, one weight at a time.

This module is plain PyTorch and measures only: the CLI feeds it batches, and
`importance_store.py` stores what it returns; the rule that turns it into masks (normalise,
combine, 1 - I per row) is `softmask.py`'s.
"""

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

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

Estimator = Literal["das", "fisher", "activation"]
ESTIMATORS: tuple[Estimator, ...] = ("das", "fisher", "activation")
DEFAULT_ESTIMATOR: Estimator = "activation"
"""`soft_mask.estimator` when unset: the one whose importance is stable at the default budget
(`benchmarks/importance_stability.py`)."""
NORMALIZATION: dict[str, str] = {"das": "tanh_z", "fisher": "rank", "activation": "rank"}
"""How each estimator's raw scores become I in [0, 1) (`softmask.normalize`)."""
DEFAULT_BATCHES = 16
"""Batches an importance run reads unless told otherwise (`soft_mask.max_batches`): chosen with
`benchmarks/importance_stability.py`, where the default estimator's split halves of this many
batches each agree with Spearman >= 0.9, at a cost under 5% of an epoch of the demo's domain."""


class ImportanceError(ValueError):
    """Importance that cannot be computed for, or applied to, the model at hand."""


@dataclass
class RawImportance:
    """An estimator's scores summed over the data and divided by its non-pad token count.

    `head` is [layers, query heads], `intermediate` [layers, d_ff], `output` [layers, d_model],
    all float32 on the CPU; `tokens` is the number of non-pad tokens (over all ranks) behind them;
    `estimator` the one that measured them (`ESTIMATORS`).
    """

    head: Tensor
    intermediate: Tensor
    output: Tensor
    tokens: int
    estimator: Estimator

    def tensors(self) -> dict[str, Tensor]:
        return {"head": self.head, "intermediate": self.intermediate, "output": self.output}


@dataclass
class Partitioned:
    """A model whose weights are partitioned over the ranks, each rank holding a slice of every
    weight (DeepSpeed ZeRO-3), and an engine whose hooks gather each layer's weights for its
    forward and backward."""

    gather: Callable[[list[Tensor]], AbstractContextManager]
    """(parameters) -> a context in which they hold their whole values on every rank, entered by
    all ranks together (`deepspeed.zero.GatheredParameters`)."""
    release: Callable[[], None]
    """Release every gathered weight (`DeepSpeedEngine.empty_partition_cache`): the engine's
    hooks leave some gathered after a backward whose order differs from the forward's."""


@dataclass
class _HookedLayer:
    """One decoder layer's hook points, its virtual gates (float32 leaves) and what the
    estimator has summed for its units so far."""

    attn_out: nn.Module
    ffn_down: nn.Module
    head_gate: Tensor
    intermediate_gate: Tensor
    output_gate: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Pass:
    """What the hooks of one estimator do to the units they see during a batch."""

    noise: float = 0.0  # dropout probability injected on head outputs and the MLP output
    gated: bool = True  # multiply by the gates (so they are in the graph)
    square_gradients: bool = False  # fisher: add each token's squared gate gradient to `sums`
    energy: bool = False  # activation: add each token's squared activation to `sums`
    keep: Tensor | None = None  # [batch, seq] non-pad positions of the current batch


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
    estimator: Estimator,
    dropout: float = 0.003,
    seed: int = 0,
    progress: bool = True,
    partitioned: Partitioned | None = None,
) -> RawImportance:
    """Sum `estimator`'s score of every head, FFN neuron and FFN output over `batches`, divided
    by their non-pad token count.

    Each batch is `input_ids`, optional `attention_mask` and `position_ids`; other keys such as
    `labels` are ignored.
    - `das` runs each batch twice in train mode, with dropout noise of probability `dropout` on
      the head outputs and the MLP output (Hugging Face models have no dropout there: without it
      both passes agree and every gradient is zero). The loss is
      `F.kl_div(log_softmax(logits1), softmax(logits2), reduction="sum")` over the non-pad
      tokens, KL(p2 || p1), the direction DAS's code uses; the signed gate gradients add up.
      Batch k's noise is drawn with the global RNG freshly seeded from (`seed`, k); the
      caller's RNG state is restored afterwards. Not a private `torch.Generator`: gradient
      checkpointing replays only the global RNG when it recomputes a layer in the backward.
    - `fisher` runs each batch once in eval mode; the loss is the summed NLL of each non-pad
      token given the ones before it, and each token's gate gradient is squared before it adds up.
    - `activation` runs each batch once in eval mode without a graph.

    Only the gates are differentiated (`torch.autograd.grad`), and the weights are frozen for the
    pass, so no activation is kept for a weight gradient: the model's parameters, their `.grad`,
    their `requires_grad` flags and its train/eval mode end as they started.

    Under torch.distributed every rank passes the same `batches` and runs batches rank,
    rank + world size, ... (`batch_share`); the sums and token counts are then all-reduced, so
    every rank returns the token-weighted mean over all batches, which equals one process's up
    to the order of float additions. Progress shows on rank 0 only. Gradient checkpointing must
    be off or non-reentrant (reentrant checkpointing hides the gates from `autograd.grad`).

    With `partitioned` weights every pass is collective, so every rank runs as many as the rank
    with the most batches, the extra ones a batch with no token counted; the gathered weights are
    released after each batch, and the `activation` weight norms are read through
    `partitioned.gather`, one weight at a time. None: every rank holds the whole model.
    """
    if estimator not in ESTIMATORS:
        raise ImportanceError(
            f"cofitune: unknown importance estimator {estimator!r}; one of {', '.join(ESTIMATORS)}"
        )
    layers = _hook_points(model, architecture, layer_prefix)
    n_heads = _text_config(model).num_attention_heads
    for layer in layers:
        layer.sums = {unit: torch.zeros_like(gate) for unit, gate in zip(UNITS, _gates(layer))}
    gates = [g for layer in layers for g in _gates(layer)]
    sums = [layer.sums[unit] for layer in layers for unit in UNITS]
    state = _Pass(
        noise=dropout if estimator == "das" else 0.0,
        gated=estimator != "activation",
        square_gradients=estimator == "fisher",
        energy=estimator == "activation",
    )
    tokens = 0
    input_device = model.get_input_embeddings().weight.device

    handles = []
    was_training = model.training
    try:
        for layer in layers:
            handles += [
                layer.attn_out.register_forward_pre_hook(_on_heads(layer, n_heads, state)),
                layer.ffn_down.register_forward_pre_hook(_on_intermediate(layer, state)),
                layer.ffn_down.register_forward_hook(_on_output(layer, state)),
            ]
        model.train(estimator == "das")
        share = batch_share(len(batches))
        passes: list[int | None] = list(share)
        if partitioned:  # lockstep: the busiest rank's count, the rest counting nothing
            passes += [None] * (len(range(0, len(batches), share.step)) - len(passes))
        shown = progress and share.start == 0  # rank 0's only
        no_graph = torch.no_grad() if estimator == "activation" else nullcontext()
        with _frozen(model), _forked_rng(model), no_graph:
            for index in tqdm(passes, desc=f"cofitune importance ({estimator})", disable=not shown):
                inputs = _model_inputs(batches[0 if index is None else index], input_device)
                keep = (inputs["attention_mask"] != 0) & (index is not None)
                batch_tokens = int(keep.sum())
                if batch_tokens == 0 and not partitioned:
                    continue
                state.keep = keep
                if estimator == "das":
                    torch.manual_seed(_batch_seed(seed, -1 if index is None else index))
                    logits1 = model(**inputs, use_cache=False).logits[keep].float()
                    logits2 = model(**inputs, use_cache=False).logits[keep].float()
                    loss = F.kl_div(
                        F.log_softmax(logits1, dim=-1), F.softmax(logits2, dim=-1), reduction="sum"
                    )
                    for total, grad in zip(sums, torch.autograd.grad(loss, gates)):
                        total.add_(grad)
                elif estimator == "fisher":
                    # the per-token squares add up in the gates' tensor hooks
                    torch.autograd.grad(_text_nll(model, inputs, keep), gates)
                else:
                    model(**inputs, use_cache=False)
                if partitioned:
                    partitioned.release()
                tokens += batch_tokens
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        state.keep = None

    if _distributed():
        tokens = _all_reduce_sums(sums, tokens, input_device)
    if tokens == 0:
        raise ImportanceError("cofitune importance: the data held no non-pad token")
    if estimator == "activation":
        _times_fed_weight_norms(layers, n_heads, partitioned.gather if partitioned else _held)
    return RawImportance(
        **{
            unit: torch.stack([layer.sums[unit].cpu() for layer in layers]) / tokens
            for unit in UNITS
        },
        tokens=tokens,
        estimator=estimator,
    )


def batch_share(count: int) -> range:
    """The indices, among `count` global batches, of those this rank computes: every
    world-size-th from its rank under torch.distributed, else all of them."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    return range(rank, count, world_size)


def _text_nll(model: nn.Module, inputs: dict[str, Tensor], keep: Tensor) -> Tensor:
    """The summed NLL of every non-pad token that follows a non-pad token."""
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = inputs["input_ids"][:, 1:]
    scored = keep[:, 1:] & keep[:, :-1]
    return F.cross_entropy(logits[scored], targets[scored], reduction="sum")


def _dropout(x: Tensor, p: float) -> Tensor:
    """`x` with each element zeroed with probability p, the rest scaled by 1 / (1 - p)."""
    if p == 0:
        return x
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


def _observe(units: Tensor, gated: Tensor, total: Tensor, state: _Pass) -> None:
    """Add what `state`'s estimator takes of this batch's `units` ([batch, seq, n, ...], the
    values the gates multiply) to `total` [n]: their energy now, or once the backward reaches
    `gated` (the gated values), each token's squared gate gradient."""
    keep = state.keep

    def per_token(values: Tensor) -> Tensor:  # [batch, seq, n, ...] -> [tokens, n], float32
        values = values[keep].float()
        return values.flatten(2).sum(-1) if values.dim() > 2 else values

    if state.energy:
        total.add_(per_token(units.float().square()).sum(0))
    if state.square_gradients and gated.requires_grad:

        def add_squared_gate_gradient(grad: Tensor) -> None:  # d loss / d gate, per token
            total.add_(per_token(grad.float() * units.float()).square().sum(0))

        gated.register_hook(add_squared_gate_gradient)


def _on_heads(layer: _HookedLayer, n_heads: int, state: _Pass):
    """Pre-hook on the attention output projection: noise, then one gate per query head."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        heads = _dropout(args[0], state.noise).unflatten(-1, (n_heads, -1))
        gated = heads * layer.head_gate.to(heads.dtype)[:, None] if state.gated else heads
        _observe(heads, gated, layer.sums["head"], state)
        return (gated.flatten(-2), *args[1:])

    return hook


def _on_intermediate(layer: _HookedLayer, state: _Pass):
    """Pre-hook on the down projection: one gate per intermediate neuron."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        neurons = args[0]
        gated = neurons * layer.intermediate_gate.to(neurons.dtype) if state.gated else neurons
        _observe(neurons, gated, layer.sums["intermediate"], state)
        return (gated, *args[1:])

    return hook


def _on_output(layer: _HookedLayer, state: _Pass):
    """Forward hook on the down projection: noise on the MLP output, then one gate per dim."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        output = _dropout(output, state.noise)
        gated = output * layer.output_gate.to(output.dtype) if state.gated else output
        _observe(output, gated, layer.sums["output"], state)
        return gated

    return hook


def _held(params: list[Tensor]) -> AbstractContextManager:
    """`Partitioned.gather` for parameters that hold their values already."""
    return nullcontext()


@torch.no_grad()
def _times_fed_weight_norms(
    layers: list[_HookedLayer],
    n_heads: int,
    gather: Callable[[list[Tensor]], AbstractContextManager],
) -> None:
    """Scale each head's and neuron's activation energy by the squared norm of the weights its
    activation feeds: the head's columns of the output projection, the neuron's column of the
    down projection. (The FFN output dimensions feed the residual stream: their energy stands.)

    Partitioned weights are gathered one at a time: DeepSpeed 0.18's gather of several waits
    on the last one's all-gather only, so over gloo (CPU) the others' values could be read
    before they arrive (measured: the first weight's norms were garbage, once `inf`)."""
    for layer in layers:
        for module, unit in ((layer.attn_out, "head"), (layer.ffn_down, "intermediate")):
            with gather([module.weight]):
                weight = module.weight
                if tuple(weight.shape) != (module.out_features, module.in_features):
                    raise ImportanceError(
                        "cofitune: the `activation` importance estimator reads the weights, "
                        "which this model stores packed (4-bit); use `estimator: fisher`"
                    )
                norms = weight.float().square().sum(0)  # per input column
            if unit == "head":
                norms = norms.unflatten(0, (n_heads, -1)).sum(-1)
            layer.sums[unit].mul_(norms.to(layer.sums[unit].device))


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
    """Sum the per-unit sums and token counts of all ranks (one collective for the tensors)."""
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
