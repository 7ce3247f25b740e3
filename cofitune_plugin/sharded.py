"""Where this rank's share of a parameter lives under FSDP2 and DeepSpeed ZeRO-2/3.

Soft masks (`softmask.SoftMask`) act on the values the optimizer steps and on the gradients
autograd produces. Sharding engines move both, so `EnginePlacement` tells the mask, per
parameter, where they are on this rank, using each engine's own public structures:

- FSDP2 (`fully_shard`): parameters are DTensors sharded by rows (`Shard(0)`); the optimizer
  steps each rank's `to_local()` rows, and the row mask is distributed with the parameter's own
  placements. Tensor hooks on the sharded parameter never fire: FSDP2 runs the forward and
  backward on an unsharded parameter that it reuses across steps, so gradient hooks go on that
  one, registered from the owning module's forward pre-hook (after FSDP2 unshards it).
- DeepSpeed ZeRO-2: the inner torch optimizer steps flat fp32 partitions; `param._hp_mapping`
  (DeepSpeed's `tensor_fragment`) names the fragment of this parameter in this rank's partition
  and where it starts in the flattened parameter. A fragment may start or end mid-row.
- DeepSpeed ZeRO-3: `deepspeed.utils.safe_get_local_fp32_param` is this rank's fp32 partition,
  elements [rank * n, (rank + 1) * n) of the flattened parameter, padded at the end.

Under DeepSpeed, gradient hooks on the parameter see the full, not yet reduced gradient (the
engine reduces in its post-accumulate hooks), so they stay as without sharding. Nothing here
gathers a parameter or a gradient: each rank masks what it holds.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.hooks import RemovableHandle

from cofitune_plugin import importance_store
from cofitune_plugin.softmask import PlainPlacement


def engine_of(param: Tensor) -> str:
    """What holds `param`'s values on this rank, from what the engine left on it."""
    if isinstance(param, DTensor):
        return "FSDP2 shards"
    if hasattr(param, "ds_id"):
        return "DeepSpeed ZeRO-3 partitions"
    if hasattr(param, "_hp_mapping"):
        return "DeepSpeed ZeRO-2 partitions"
    return "parameters"


class EnginePlacement(PlainPlacement):
    """Picks each parameter's engine from what the engine left on it; plain otherwise."""

    def shape(self, param: Tensor) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)  # a ZeRO-3 parameter's own data is empty

    def local_rows(self, param: Tensor, factor: Tensor) -> list[tuple[Tensor, Tensor]]:
        if isinstance(param, DTensor):
            # FSDP2: the rows of the mask that match this rank's rows, without communication
            local = distribute_tensor(
                factor.to(param.to_local().device),
                param.device_mesh,
                param.placements,
                src_data_rank=None,
            )
            return [(param.to_local(), local.to_local())]
        if hasattr(param, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_fp32_param

            values = safe_get_local_fp32_param(param)
            start = dist.get_rank(param.ds_process_group) * param.ds_tensor.ds_numel
            return flat_rows(values, start, self.shape(param), factor)
        mapping = getattr(param, "_hp_mapping", False)
        if mapping is None:  # ZeRO-2: no element of this parameter in this rank's partition
            return []
        if mapping:  # ZeRO-2
            address = mapping.lp_fragment_address
            return flat_rows(mapping.get_hp_fragment(), address.start, param.shape, factor)
        return super().local_rows(param, factor)

    def hook_gradient(
        self, module: nn.Module, name: str, param: Tensor, hook: Callable[[Tensor], Tensor]
    ) -> list[RemovableHandle]:
        if not isinstance(param, DTensor):
            return super().hook_gradient(module, name, param, hook)
        unsharded: list[Tensor] = []
        handles: list[RemovableHandle] = []

        def hook_unsharded(module: nn.Module, args: tuple) -> None:
            current = getattr(module, name)
            if not any(current is seen for seen in unsharded) and current.requires_grad:
                unsharded.append(current)
                handles.append(current.register_hook(hook))

        handles.append(module.register_forward_pre_hook(hook_unsharded))
        return [_RemoveAll(handles)]


class _RemoveAll:
    """One handle for a module hook and the tensor hooks it registers later."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def flat_rows(
    values: Tensor, start: int, shape: torch.Size, factor: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """A flat slice of a parameter, elements [start, start + len(values)) of it flattened, as
    row-aligned 2-D views paired with their rows' factors: a partial first row, the whole rows,
    a partial last row. Padding past the parameter's end is left out."""
    columns = shape[1:].numel()
    end = min(start + values.numel(), shape.numel())
    pieces = []
    position = start
    while position < end:
        row, column = divmod(position, columns)
        if column or end - position < columns:  # a partial row
            width = min(columns - column, end - position)
            rows, view = slice(row, row + 1), values[position - start : position - start + width]
            view = view.view(1, width)
        else:
            count = (end - position) // columns
            rows = slice(row, row + count)
            width = count * columns
            view = values[position - start : position - start + width].view(count, columns)
        pieces.append((view, factor[rows]))
        position += width
    return pieces


def sampled_values(param: Tensor, count: int) -> tuple[torch.Size, Tensor]:
    """The full shape and `count` evenly spaced values of a parameter (for the importance's
    weight fingerprint). A ZeRO-3 partition holds a slice of them: each rank fills in the values
    it holds and one all-reduce of `count` numbers completes them, instead of gathering the
    parameter."""
    if not hasattr(param, "ds_id"):
        return importance_store.sampled_values(param, count)
    shape = param.ds_shape
    local = param.ds_tensor.detach()
    positions = importance_store.sample_positions(shape.numel(), count).to(local.device)
    start = dist.get_rank(param.ds_process_group) * param.ds_tensor.ds_numel
    here = (positions >= start) & (positions < start + local.numel())
    values = torch.zeros(count, dtype=torch.float32, device=local.device)
    values[here] = local[positions[here] - start].float()
    dist.all_reduce(values, group=param.ds_process_group)
    return shape, values
