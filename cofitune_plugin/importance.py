"""How much a model's general ability relies on each unit: heads, FFN neurons, FFN outputs.

CoFiTune's fine level (after DAS, Ke et al. ICLR 2023) protects the units a model's versatility
depends on. Their importance is measured once, before training, without labels: all-ones virtual
gates are attached to every head output, FFN intermediate neuron and FFN output dimension, each
batch runs twice in train mode with a little dropout noise injected, and the gradient of the KL
divergence between the two passes with respect to each gate says how much that unit moves the
output distribution. The gates are forward hooks, so any supported Hugging Face model works
unmodified.

This module is plain PyTorch: `plugin.py` and the CLI feed it batches and store what it returns.
"""

import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from cofitune_plugin.architectures import Architecture
from cofitune_plugin.lora import adapter_parameter_ids

IMPORTANCE_FILE = "importance.safetensors"
MANIFEST_FILE = "manifest.json"
UNITS = ("head", "intermediate", "output")
_FINGERPRINT_SAMPLES = 16


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
class NormalizedImportance:
    """Importance I in [0, 1) per unit, shaped like `RawImportance`; soft masks scale by 1 - I."""

    head: Tensor
    intermediate: Tensor
    output: Tensor


@dataclass
class _HookedLayer:
    """One decoder layer's hook points and its virtual gates (float32 leaves)."""

    attn_out: nn.Module
    ffn_down: nn.Module
    head_gate: Tensor
    intermediate_gate: Tensor
    output_gate: Tensor


def compute_importance(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    architecture: Architecture,
    layer_prefix: str,
    dropout: float = 0.003,
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
    dropout there: without it both passes agree and every gradient is zero. Under
    torch.distributed the sums and token counts are all-reduced, so every rank returns the
    token-weighted mean over all ranks' data. Gradient checkpointing must be off or
    non-reentrant (reentrant checkpointing hides the gates from `autograd.grad`).
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
        with _frozen(model):
            for batch in tqdm(batches, desc="cofitune importance", disable=not progress):
                inputs = _model_inputs(batch, input_device)
                keep = inputs["attention_mask"] != 0
                batch_tokens = int(keep.sum())
                if batch_tokens == 0:
                    continue
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

    if dist.is_available() and dist.is_initialized():
        tokens = _all_reduce_sums(sums, tokens, input_device)
    if tokens == 0:
        raise ImportanceError("cofitune importance: the data held no non-pad token")
    return RawImportance(
        head=torch.stack([s.cpu() for s in head_sums]) / tokens,
        intermediate=torch.stack([s.cpu() for s in intermediate_sums]) / tokens,
        output=torch.stack([s.cpu() for s in output_sums]) / tokens,
        tokens=tokens,
    )


def normalize(raw: Tensor) -> Tensor:
    """Per layer (row): z-score over the layer's units, then |tanh(z)|, giving I in [0, 1).

    Uses the unbiased standard deviation, as DAS does. A row whose units are all equal carries
    no ranking, so it maps to zeros (no protection) rather than to NaN.
    """
    raw = raw.float()
    mean = raw.mean(dim=1, keepdim=True)
    std = raw.std(dim=1, keepdim=True)
    z = torch.where(std > 0, (raw - mean) / std, torch.zeros_like(raw))
    return torch.tanh(z).abs()


def model_manifest(
    model: nn.Module,
    architecture: Architecture,
    layer_prefix: str,
    sampler: Callable[[Tensor, int], tuple[torch.Size, Tensor]] | None = None,
) -> dict:
    """The fields that tie importance to one model: store them with it, check them at load.
    `sampler`: see `model_fingerprint`."""
    layers = _hook_points(model, architecture, layer_prefix)
    return {
        "model_type": _text_config(model).model_type,
        "num_layers": len(layers),
        "n_heads": layers[0].head_gate.numel(),
        "d_ff": layers[0].intermediate_gate.numel(),
        "d_model": layers[0].output_gate.numel(),
        "fingerprint": model_fingerprint(model, sampler),
    }


Sampler = Callable[[Tensor, int], tuple[torch.Size, Tensor]]
"""(parameter, count) -> the parameter's full shape and `count` evenly spaced values of it."""


def sample_positions(numel: int, count: int) -> Tensor:
    """`count` evenly spaced flat positions from the first element to the last."""
    # integer spacing: float32 linspace rounds past the last index of large tensors
    return torch.arange(count) * (numel - 1) // (count - 1)


def sampled_values(param: Tensor, count: int) -> tuple[torch.Size, Tensor]:
    """A parameter that holds all its values: its shape and `count` evenly spaced values."""
    flat = param.detach().reshape(-1)
    if flat.numel() == 0:
        return param.shape, flat
    return param.shape, flat[sample_positions(flat.numel(), count).to(flat.device)]


def model_fingerprint(model: nn.Module, sampler: Sampler | None = None) -> str:
    """A cheap hash of the weights: model type, every parameter's shape, and 16 evenly spaced
    values of every parameter.

    Values are rounded to bfloat16 first, so the same checkpoint loaded in float32 or bfloat16
    gives the same fingerprint; different weights (another checkpoint, a fine-tuned copy) almost
    surely do not. Parameter names are left out so that wrappers adding prefixes do not matter,
    and so are LoRA adapters, so that a LoRA run matches the importance of its base model.

    `sampler` reads a parameter's shape and values where the parameter does not hold them all
    itself (a DeepSpeed ZeRO-3 partition: `sharded.sampled_values`); by default, the tensor.
    """
    sampler = sampler or sampled_values
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    adapters = adapter_parameter_ids(model)
    for param in model.parameters():
        if id(param) in adapters:
            continue
        shape, values = sampler(param, _FINGERPRINT_SAMPLES)
        digest.update(str(tuple(shape)).encode())
        if values.numel() == 0:
            continue
        sample = values.to(torch.bfloat16).float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(batches: Iterable[dict[str, Tensor] | Tensor | Sequence[int]]) -> str:
    """A hash of the non-pad token ids, row by row, in order.

    Accepts batches (dicts with `input_ids` and optional `attention_mask`), id tensors ([T] or
    [B, T]) or lists of ids. Padding is dropped, so padding side and padded length do not matter.
    """
    digest = hashlib.sha256()
    for row in _token_rows(batches):
        digest.update(len(row).to_bytes(8, "little"))
        digest.update(row.numpy().tobytes())
    return digest.hexdigest()


def save_importance(
    raw: RawImportance, directory: Path, manifest: dict, overwrite: bool = False
) -> None:
    """Write `importance.safetensors` (raw float32 tensors) and `manifest.json` to `directory`.

    The manifest is `manifest` plus the token count, the tensor shapes, the dimensions they imply
    (num_layers, n_heads, d_ff, d_model: what `load_importance` checks) and the plugin version.
    It is written last, so a directory without one is an interrupted save. An existing importance
    is an expensive result: it is only replaced when `overwrite` is True.
    """
    directory = Path(directory)
    existing = [name for name in (IMPORTANCE_FILE, MANIFEST_FILE) if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"cofitune: {directory} already holds an importance ({', '.join(existing)}); choose "
            "another directory, or pass overwrite=True to replace it"
        )
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in raw.tensors().items()}
    dimensions = {
        "num_layers": tensors["head"].shape[0],
        "n_heads": tensors["head"].shape[1],
        "d_ff": tensors["intermediate"].shape[1],
        "d_model": tensors["output"].shape[1],
    }
    conflicting = {k: v for k, v in dimensions.items() if k in manifest and manifest[k] != v}
    if conflicting:
        raise ValueError(
            f"cofitune: the manifest says { ({k: manifest[k] for k in conflicting}) } but the "
            f"importance tensors have {conflicting}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / IMPORTANCE_FILE, metadata={"format": "pt"})
    full_manifest = {
        **manifest,
        **dimensions,
        "tokens": raw.tokens,
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "plugin_version": _plugin_version(),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, sort_keys=True))


def load_importance(directories: Sequence[Path], expected: dict) -> NormalizedImportance:
    """Read one or more importance directories, check them against `expected`, normalise each
    run and combine the runs by elementwise max (a unit is protected if any run needs it).

    `expected` is usually `model_manifest(model, ...)` of the model about to be trained; every
    key in it must be present and equal in each directory's manifest.
    """
    if not directories:
        raise ImportanceError("cofitune.soft_mask.importance: no directory given")
    combined: dict[str, Tensor] = {}
    for directory in map(Path, directories):
        raw = _read_checked(directory, expected)
        for name in UNITS:
            normalized = normalize(raw[name])
            combined[name] = (
                torch.maximum(combined[name], normalized) if name in combined else normalized
            )
    return NormalizedImportance(**combined)


def _read_checked(directory: Path, expected: dict) -> dict[str, Tensor]:
    rerun = (
        "Re-run `axolotl cofitune-importance` with this model to compute a matching importance, "
        "or point `cofitune.soft_mask.importance` at one made for it."
    )
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ImportanceError(
            f"cofitune: {directory} has no {MANIFEST_FILE}, so nothing says which model its "
            f"importance belongs to (missing directory, or an interrupted save). {rerun}"
        )
    manifest = json.loads(manifest_path.read_text())
    for field, model_value in expected.items():
        file_value = manifest.get(field, "<missing>")
        if file_value != model_value:
            raise ImportanceError(
                f"cofitune: the importance in {directory} does not match the model being "
                f"trained: {field} is {file_value!r} in {manifest_path} but {model_value!r} for "
                f"the model. {rerun}"
            )
    tensors_path = directory / IMPORTANCE_FILE
    if not tensors_path.is_file():
        raise ImportanceError(f"cofitune: {directory} has a manifest but no {IMPORTANCE_FILE}")
    tensors = load_file(tensors_path)
    shapes = {name: list(tensors[name].shape) for name in UNITS if name in tensors}
    if shapes != manifest.get("shapes"):
        raise ImportanceError(
            f"cofitune: {tensors_path} holds tensors shaped {shapes}, but its manifest says "
            f"{manifest.get('shapes')}; the directory is corrupt. {rerun}"
        )
    return tensors


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
        heads = F.dropout(args[0], dropout, training=True).unflatten(-1, (n_heads, -1))
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
        return F.dropout(output, dropout, training=True) * gate.to(output.dtype)

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


def _all_reduce_sums(sums: list[Tensor], tokens: int, device: torch.device) -> int:
    """Sum the gate gradients and token counts of all ranks (one collective for the tensors)."""
    flat = torch.cat([s.to(device) for s in sums])
    dist.all_reduce(flat)
    for total, reduced in zip(sums, flat.split([s.numel() for s in sums])):
        total.copy_(reduced)
    count = torch.tensor([tokens], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    return int(count.item())


def _token_rows(batches: Iterable[Any]) -> Iterator[Tensor]:
    """Yield each sequence's non-pad token ids as a 1-D int64 CPU tensor."""
    for batch in batches:
        if isinstance(batch, dict):
            ids = torch.as_tensor(batch["input_ids"]).cpu()
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).cpu()
        else:
            ids = torch.as_tensor(batch).cpu()
            mask = torch.ones_like(ids)
        for row, row_mask in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])):
            yield row[row_mask != 0].long()


def _text_config(model: nn.Module) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    return model.config.get_text_config()


def _plugin_version() -> str:
    """Read from package metadata: importing `cofitune_plugin` itself would import Axolotl."""
    try:
        return importlib.metadata.version("cofitune-plugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
