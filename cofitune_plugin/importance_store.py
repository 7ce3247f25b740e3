"""The stored importance: what ties it to one model and one data set, and its files.

An importance run is expensive (two forward passes and a backward through every layer per
batch), so it is measured once (`importance.py`, `axolotl cofitune-importance`) and stored:
`importance.safetensors` (the raw per-unit scores) beside `manifest.json` (the model's type,
dimensions and weight fingerprint, the data's fingerprint, the settings). Loading checks the
manifest against the model about to be trained and refuses a mismatch by the field that differs,
then turns the runs into I in [0, 1) with the soft-mask rule (`softmask.combine`).
"""

import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cofitune_plugin.architectures import Architecture
from cofitune_plugin.importance import (
    NORMALIZATION,
    UNITS,
    ImportanceError,
    RawImportance,
    unit_counts,
)
from cofitune_plugin.lora import adapter_parameter_ids
from cofitune_plugin.softmask import NormalizedImportance, combine

IMPORTANCE_FILE = "importance.safetensors"
MANIFEST_FILE = "manifest.json"
_FINGERPRINT_SAMPLES = 16

Sampler = Callable[[Tensor, int], tuple[torch.Size, Tensor]]
"""(parameter, count) -> the parameter's full shape and `count` evenly spaced values of it."""


def model_manifest(
    model: nn.Module, architecture: Architecture, layer_prefix: str, sampler: Sampler | None = None
) -> dict:
    """The fields that tie importance to one model: store them with it, check them at load.
    `sampler`: see `model_fingerprint`."""
    return {
        "model_type": model.config.get_text_config().model_type,
        **unit_counts(model, architecture, layer_prefix),
        "fingerprint": model_fingerprint(model, sampler),
    }


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

    The manifest is `manifest` plus the estimator and its normalisation, the token count, the
    tensor shapes, the dimensions they imply (num_layers, n_heads, d_ff, d_model: what
    `load_importance` checks) and the plugin version.
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
        "estimator": raw.estimator,
        "normalization": NORMALIZATION[raw.estimator],
        "tokens": raw.tokens,
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "plugin_version": _plugin_version(),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, sort_keys=True))


def load_importance(
    directories: Sequence[Path], expected: dict, estimator: str
) -> NormalizedImportance:
    """Read one or more importance directories, check them against `expected` and `estimator`,
    and combine the runs into I (`softmask.combine`: each normalised as `estimator`'s scores
    are, then the elementwise max).

    `expected` is usually `model_manifest(model, ...)` of the model about to be trained; every
    key in it must be present and equal in each directory's manifest. `estimator` is the
    recipe's `cofitune.soft_mask.estimator`: an importance measured by another is refused,
    naming both (the scores of two estimators do not mean the same thing).
    """
    if not directories:
        raise ImportanceError("cofitune.soft_mask.importance: no directory given")
    runs = [_read_checked(Path(directory), expected, estimator) for directory in directories]
    return combine(runs, NORMALIZATION[estimator])


def _read_checked(directory: Path, expected: dict, estimator: str) -> dict[str, Tensor]:
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
    measured = manifest.get("estimator", "<none recorded>")
    if measured != estimator or manifest.get("normalization") != NORMALIZATION[estimator]:
        raise ImportanceError(
            f"cofitune: the importance in {directory} was measured with estimator {measured!r} "
            f"(normalization {manifest.get('normalization', '<none recorded>')!r}), but the "
            f"recipe's cofitune.soft_mask.estimator is {estimator!r} (normalization "
            f"{NORMALIZATION[estimator]!r}). Re-run `axolotl cofitune-importance` with the "
            f"recipe (--overwrite), or set `cofitune.soft_mask.estimator: {measured}`."
        )
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


def _plugin_version() -> str:
    """Read from package metadata: importing `cofitune_plugin` itself would import Axolotl."""
    try:
        return importlib.metadata.version("cofitune-plugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
