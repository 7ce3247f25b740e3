"""Soft masks: scale what training does to each row of the trained modules by (1 - importance).

A row of a projection's weight produces one output unit, so its gradient (or update) is scaled by
1 - I of the unit it produces: up-projection rows by their intermediate neuron, down-projection
rows by their FFN output dimension, query/key/value rows by their attention head. Row-aligned, as
the paper intends (the original code tiled masks over flat ZeRO shards, which scrambles rows).
I itself is made here too from the measured importance (`normalize`, `combine`), so the whole
rule, raw importance -> I -> 1 - I per row -> what training does, reads in this one file.

Two ways to apply them:
- `gradient` (the paper): scale each gradient as autograd produces it.
- `update`: let the optimizer step, then keep only `mask` of each row's change. Adam(W) normalises
  a constant per-element gradient scale s almost away (its step is m / (sqrt(v) + eps / s)), so a
  gradient mask only bites where s is tiny; masking the update gives the intended effect.
"""

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from cofitune_plugin.importance import UNITS
from cofitune_plugin.selection import Selection, split_layer_name


@dataclass
class NormalizedImportance:
    """Importance I in [0, 1) per unit, shaped like `RawImportance`; soft masks scale by 1 - I."""

    head: Tensor
    intermediate: Tensor
    output: Tensor


def normalize(raw: Tensor, normalization: str = "tanh_z") -> Tensor:
    """Per layer (row), the raw scores of one unit type mapped monotonically to I in [0, 1).

    - `tanh_z` (the paper's, for the signed `das` scores): z-score over the layer's units, then
      |tanh(z)|, with the unbiased standard deviation, as DAS does. It protects large scores of
      either sign alike.
    - `rank` (for non-negative scores: `fisher`, `activation`): the unit's rank among the
      layer's units over their count, ties sharing their mean rank: 0 for the least important,
      (n - 1) / n for the most. Unlike a z-score it neither depends on the scores' heavy tails
      nor protects the least important units.

    A row whose units are all equal carries no ranking, so it maps to zeros (no protection)
    rather than to NaN or to the middle.
    """
    raw = raw.float()
    if normalization == "rank":
        ordered = raw.sort(dim=1).values
        below = torch.searchsorted(ordered, raw, right=False)
        not_above = torch.searchsorted(ordered, raw, right=True)
        ranks = (below + not_above - 1).float() / 2 / raw.shape[1]
        constant = ordered[:, :1] == ordered[:, -1:]
        return torch.where(constant, torch.zeros_like(ranks), ranks)
    if normalization != "tanh_z":
        raise ValueError(f"unknown importance normalization {normalization!r}")
    mean = raw.mean(dim=1, keepdim=True)
    std = raw.std(dim=1, keepdim=True)
    z = torch.where(std > 0, (raw - mean) / std, torch.zeros_like(raw))
    return torch.tanh(z).abs()


def combine(
    runs: Sequence[Mapping[str, Tensor]], normalization: str = "tanh_z"
) -> NormalizedImportance:
    """I of one or more importance runs of one estimator (raw tensors by unit): each run
    normalised by `normalization`, then the elementwise max, so a unit is protected if any run
    needs it."""
    return NormalizedImportance(
        **{
            unit: functools.reduce(
                torch.maximum, (normalize(run[unit], normalization) for run in runs)
            )
            for unit in UNITS
        }
    )


class SoftMaskError(ValueError):
    """A selection the soft masks cannot cover; the message names the parameter and the fix."""


def row_masks(
    model: nn.Module, selection: Selection, importance: NormalizedImportance
) -> dict[str, Tensor]:
    """Map each selected parameter name to a float32 mask over its rows (dim 0), 1 - I.

    - up projection rows: 1 - I_intermediate; a fused [gate; up] projection (Phi-3) gives both
      halves the neuron's mask.
    - down projection rows: 1 - I_output.
    - query rows: 1 - I_head, repeated over the head dimension. Key/value rows (GQA: one per
      group of n_heads / n_kv_heads query heads) take 1 - the *largest* I of the query heads
      they serve: conservative, a key/value head is as protected as its most important user.
    - fused q/k/v: `concat` rows [q; k; v] (Phi-3) are masked as above block by block;
      `interleaved` rows (GPT-NeoX, which has no GQA, so `n_kv_heads` is not used) are laid out
      per head as [q_h; k_h; v_h] (GPTNeoXAttention views the projection as
      [..., n_heads, 3 * head_dim] and chunks the last dim in three), so all 3 * head_dim rows of
      head h take 1 - I_head[h].
    - biases take their weight's row mask.

    Parameters outside the importance's units (raw names such as o_proj or gate_proj) are refused
    rather than left unmasked, which would silently train them harder than the rest.
    """
    architecture = selection.architecture
    n_heads, n_kv_heads = selection.n_heads, selection.n_kv_heads
    if architecture.ffn_down is None or architecture.attn_out is None:
        raise SoftMaskError(
            f"cofitune.soft_mask: not supported for model_type '{selection.model_type}' (MoE "
            "experts are fused tensors with no per-neuron module); remove `soft_mask` to train "
            "without masks"
        )
    up_paths = [path for path in architecture.ffn if path != architecture.ffn_down]
    num_layers, importance_heads = importance.head.shape
    if importance_heads != n_heads:
        raise SoftMaskError(
            f"cofitune.soft_mask: the importance has {importance_heads} heads per layer but the "
            f"model has {n_heads}"
        )
    masks: dict[str, Tensor] = {}
    for name in selection.parameters:
        param = model.get_parameter(name)
        layer, path = split_layer_name(name, selection.layer_prefix)
        module_path = path.rpartition(".")[0]
        if param.dim() > 2:
            raise SoftMaskError(
                f"cofitune.soft_mask: {name} is a {param.dim()}-D tensor of stacked MoE experts; "
                "soft masks on MoE experts are not supported. Remove `soft_mask`."
            )
        if layer >= num_layers:
            raise SoftMaskError(
                f"cofitune.soft_mask: {name} is in layer {layer}, but the importance covers "
                f"{num_layers} layers"
            )
        # the module's out_features where it has one: 4-bit weights are stored packed
        rows = getattr(model.get_submodule(name.rpartition(".")[0]), "out_features", len(param))
        if module_path in up_paths:
            keep = _tiled(1 - importance.intermediate[layer], rows, name)
        elif module_path == architecture.ffn_down:
            keep = _tiled(1 - importance.output[layer], rows, name)
        elif module_path in architecture.mha:
            role = "q" if module_path == architecture.mha[0] else "kv"
            keep = _attention_rows(
                importance.head[layer], architecture.qkv_layout, role, rows, n_kv_heads, name
            )
        else:
            raise SoftMaskError(
                f"cofitune.soft_mask: {name} has no importance: soft masks cover the `ffn` and "
                "`mha` modules only (up/down and q/k/v projections). Remove the raw module "
                f"'{module_path.rpartition('.')[2]}' from cofitune.modules, or remove `soft_mask`."
            )
        masks[name] = keep.to(device=param.device, dtype=torch.float32)
    return masks


def _tiled(keep: Tensor, rows: int, name: str) -> Tensor:
    """`keep` per unit, tiled when the projection fuses several blocks of units ([gate; up])."""
    if rows % keep.numel():
        raise SoftMaskError(
            f"cofitune.soft_mask: {name} has {rows} rows, not a multiple of the importance's "
            f"{keep.numel()} units; the importance does not fit this model"
        )
    return keep.repeat(rows // keep.numel())


def _attention_rows(
    head_importance: Tensor, layout: str, role: str, rows: int, n_kv_heads: int, name: str
) -> Tensor:
    """Row mask of one attention projection from one layer's per-query-head importance."""
    n_heads = head_importance.numel()
    keep_query = 1 - head_importance
    if layout == "interleaved":
        return _per_head(keep_query, rows, name)
    if n_heads % n_kv_heads:
        raise SoftMaskError(
            f"cofitune.soft_mask: {n_heads} query heads do not split into {n_kv_heads} groups"
        )
    # HF's repeat_kv: key/value head j serves query heads j * group .. (j + 1) * group - 1.
    keep_kv = 1 - head_importance.view(n_kv_heads, n_heads // n_kv_heads).amax(dim=1)
    if layout == "concat":
        head_dim = rows // (n_heads + 2 * n_kv_heads)
        if head_dim * (n_heads + 2 * n_kv_heads) != rows:
            raise SoftMaskError(
                f"cofitune.soft_mask: {name} has {rows} rows, not (n_heads + 2 * n_kv_heads) = "
                f"{n_heads + 2 * n_kv_heads} heads of equal size"
            )
        kv_rows = n_kv_heads * head_dim
        return torch.cat(
            [
                _per_head(keep_query, n_heads * head_dim, name),
                _per_head(keep_kv, kv_rows, name),
                _per_head(keep_kv, kv_rows, name),
            ]
        )
    if layout == "separate":
        return _per_head(keep_query if role == "q" else keep_kv, rows, name)
    raise SoftMaskError(f"cofitune.soft_mask: unknown qkv_layout '{layout}' for {name}")


def _per_head(keep: Tensor, rows: int, name: str) -> Tensor:
    """Each head's factor repeated over its consecutive block of rows."""
    if rows % keep.numel():
        raise SoftMaskError(
            f"cofitune.soft_mask: {name} has {rows} rows, not a multiple of {keep.numel()} heads"
        )
    return keep.repeat_interleave(rows // keep.numel())


class Placement(Protocol):
    """Where a parameter's values and gradients live while it trains. A plain parameter is its
    own values; a sharded one (FSDP2, DeepSpeed ZeRO) keeps this rank's share elsewhere, and the
    placement says where (`cofitune_plugin.sharded`), so the mask rule stays engine-agnostic."""

    def shape(self, param: Tensor) -> torch.Size:
        """The parameter's shape in the full model."""

    def local_rows(self, param: Tensor, factor: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The tensors the optimizer steps for `param` on this rank, each a [rows, ...] view,
        paired with the slice of the [rows] `factor` matching those rows."""

    def hook_gradient(
        self, module: nn.Module, name: str, param: Tensor, hook: Callable[[Tensor], Tensor]
    ) -> list[RemovableHandle]:
        """Run `hook` on each gradient contribution to `param` (attribute `name` of `module`),
        before any reduction across ranks."""


class PlainPlacement:
    """A parameter that is its own values: one process, DDP."""

    def shape(self, param: Tensor) -> torch.Size:
        return param.shape

    def local_rows(self, param: Tensor, factor: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(param, factor)]

    def hook_gradient(
        self, module: nn.Module, name: str, param: Tensor, hook: Callable[[Tensor], Tensor]
    ) -> list[RemovableHandle]:
        return [param.register_hook(hook)]


class SoftMask:
    """Applies row masks to the selected parameters during training.

    `apply_to="gradient"` (the paper) registers a tensor hook per parameter that returns
    `grad * mask`. It runs on each backward's contribution before accumulation, so it is exact
    under gradient accumulation (the scaling is linear), and under DDP it runs before the reducer,
    so the all-reduced gradient is the masked one. Gradient clipping therefore sees (and clips
    by the norm of) the masked gradient.

    `apply_to="update"` needs `attach_optimizer`: a step pre-hook copies the selected parameters
    into buffers allocated once, and a step post-hook moves each row back towards its old value so
    that only `mask` of the optimizer's change remains: p = p_old + mask * (p_new - p_old). Weight
    decay is part of the change and is masked with it. Extra memory: one copy of the selected
    parameters; no allocation per step. A step the optimizer skips (fp16 overflow) runs neither.

    `placement` says where each parameter's values and gradients live: the parameters themselves
    by default; under FSDP2 or DeepSpeed ZeRO, this rank's shard or partition
    (`cofitune_plugin.sharded`), so each rank masks only what it holds, with the mask sliced to
    match, and nothing is gathered.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: dict[str, Tensor],
        apply_to: Literal["gradient", "update"],
        placement: Placement | None = None,
    ) -> None:
        if apply_to not in ("gradient", "update"):
            raise ValueError(f"apply_to must be 'gradient' or 'update', not {apply_to!r}")
        placement = placement or PlainPlacement()
        self.apply_to = apply_to
        self._parameters: list[Tensor] = []
        self._row_factors: list[Tensor] = []
        self._handles: list = []
        self._previous: list[Tensor] = []
        # each factor as bound on this rank, for `fingerprint`: update mode's are the row factors
        self._bound: list[Tensor] = self._row_factors if apply_to == "update" else []
        check_masks(model, masks, placement)
        for name, mask in masks.items():
            param = model.get_parameter(name)
            shape = placement.shape(param)
            # gradient: the kept fraction; update: the fraction of the change to undo.
            factor = mask if apply_to == "gradient" else 1 - mask
            if apply_to == "gradient":
                module_name, _, attribute = name.rpartition(".")
                self._bound.append(_per_row(factor, len(shape), param))
                self._handles += placement.hook_gradient(
                    model.get_submodule(module_name), attribute, param, _scaled_by(self._bound[-1])
                )
                continue
            for values, local_factor in placement.local_rows(param, factor):
                self._parameters.append(values)
                self._row_factors.append(_per_row(local_factor, values.dim(), values))

    def fingerprint(self) -> str:
        """A short hash of the factors bound on this rank (their shapes and values, in order):
        equal between two runs exactly when each rank masks the same rows by the same factors,
        e.g. a run resumed from a checkpoint and the run that wrote it."""
        digest = hashlib.sha256()
        for factor in self._bound:
            digest.update(str(tuple(factor.shape)).encode())
            digest.update(factor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """Mask the updates `optimizer` makes (update mode). Pass the torch optimizer that steps
        the values the placement names (under DeepSpeed, the inner one over its partitions)."""
        if self.apply_to != "update":
            raise RuntimeError(
                "attach_optimizer is for apply_to='update'; gradient masks need none"
            )
        if self._previous:
            raise RuntimeError("this SoftMask is already attached to an optimizer")
        self._previous = [torch.empty_like(values) for values in self._parameters]
        self._handles += [
            optimizer.register_step_pre_hook(self._remember),
            optimizer.register_step_post_hook(self._keep_masked_change),
        ]

    def remove(self) -> None:
        """Remove every hook and free the buffers; training goes on unmasked."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._previous = []

    @torch.no_grad()
    def _remember(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        torch._foreach_copy_(self._previous, self._parameters)

    @torch.no_grad()
    def _keep_masked_change(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        # p_new + (1 - mask) * (p_old - p_new) == p_old + mask * (p_new - p_old): one fused
        # pass per tensor (lerp) where sub_, mul_, add_ made three.
        torch._foreach_lerp_(self._parameters, self._previous, self._row_factors)


def check_masks(model: nn.Module, masks: dict[str, Tensor], placement: Placement) -> None:
    """Each mask is one factor per row of a parameter that trains."""
    for name, mask in masks.items():
        param = model.get_parameter(name)
        shape = placement.shape(param)
        if mask.dim() != 1 or mask.numel() != shape[0]:
            raise SoftMaskError(
                f"cofitune.soft_mask: the mask of {name} has shape {tuple(mask.shape)}, not "
                f"one factor per row of its {tuple(shape)} parameter"
            )
        if not param.requires_grad:
            raise SoftMaskError(f"cofitune.soft_mask: {name} is frozen; nothing to mask")


def _per_row(factor: Tensor, dims: int, like: Tensor) -> Tensor:
    """`factor` [rows] as a column that broadcasts over the rows of a `dims`-D tensor, in
    `like`'s device and dtype."""
    return factor.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (dims - 1))


def _scaled_by(factor: Tensor):
    def hook(grad: Tensor) -> Tensor:
        return grad * factor

    return hook
