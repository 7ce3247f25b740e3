"""Which parameters CoFiTune trains: a window of decoder layers times a set of modules.

Everything here works on a plain `torch.nn.Module` (a real model, or one built on the meta device
from its config so that a recipe is checked before any weight is loaded) and knows nothing of
Axolotl.
"""

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from cofitune_plugin.architectures import Architecture, architecture_for

MODULE_SETS = ("ffn", "mha")

DEPTH_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)%-(\d+(?:\.\d+)?)%$")
_INDEX_RANGE = re.compile(r"^(\d+)-(\d+)$")
_INDEX_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)+$|^\d+$")
_RAW_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SelectionError(ValueError):
    """A `cofitune.layers` or `cofitune.modules` value that cannot select anything sensible."""


def resolve_layers(spec: str | int | list[int], num_layers: int) -> list[int]:
    """Turn a layer spec into sorted, 0-indexed layer indices of an `num_layers`-layer model.

    `"25%-50%"` is a depth window: layers floor(0.25 N) .. floor(0.5 N) - 1, so windows written
    as fractions transfer across model sizes (N=40 -> 10..19, N=32 -> 8..15, N=30 -> 7..14).
    `"10-19"` is an inclusive index range; a list (or one int, or `"7-9,12"`, the form reports
    print) names the layers themselves.
    """
    if isinstance(spec, bool):
        raise SelectionError(f"cofitune.layers: {spec!r} is not a layer spec")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, list):
        layers = sorted(set(spec))
        if not layers:
            raise SelectionError("cofitune.layers: the list is empty; name at least one layer")
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
        bad += [i for i in layers if isinstance(i, int) and not 0 <= i < num_layers]
        if bad:
            raise SelectionError(
                f"cofitune.layers: {bad} out of range: the model has {num_layers} layers, "
                f"indexed 0..{num_layers - 1}"
            )
        return layers
    if not isinstance(spec, str):
        raise SelectionError(f"cofitune.layers: {spec!r} is not a layer spec")

    text = spec.replace(" ", "")
    if _INDEX_LIST.match(text):
        spans = [tuple(map(int, part.split("-"))) for part in text.split(",")]
        return resolve_layers([i for s in spans for i in range(s[0], s[-1] + 1)], num_layers)
    if match := DEPTH_WINDOW.match(text):
        lo, hi = float(match[1]), float(match[2])
        if not 0 <= lo < hi <= 100:
            raise SelectionError(
                f"cofitune.layers: '{spec}' must satisfy 0% <= start < end <= 100%"
            )
        first, stop = math.floor(lo / 100 * num_layers), math.floor(hi / 100 * num_layers)
        if first >= stop:
            raise SelectionError(
                f"cofitune.layers: '{spec}' selects no layer of a {num_layers}-layer model "
                f"(floor({lo / 100:g}*{num_layers}) = {first}, floor({hi / 100:g}*{num_layers}) "
                f"= {stop}); widen the window or name layers by index, e.g. '{first}-{first}'"
            )
        return list(range(first, stop))
    if match := _INDEX_RANGE.match(text):
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise SelectionError(f"cofitune.layers: '{spec}' is empty: write 'first-last'")
        if last >= num_layers:
            raise SelectionError(
                f"cofitune.layers: '{spec}' reaches layer {last}, but the model has {num_layers} "
                f"layers, indexed 0..{num_layers - 1}"
            )
        return list(range(first, last + 1))
    raise SelectionError(
        f"cofitune.layers: cannot read '{spec}'; write a depth window ('25%-50%'), an inclusive "
        "index range ('10-19') or a list of indices ([10, 11])"
    )


def parse_modules(modules: str | list[str]) -> list[str]:
    """Flatten `modules` (`"ffn+mha"` is shorthand for both sets) and check each name's syntax."""
    items = [modules] if isinstance(modules, str) else list(modules)
    names: list[str] = []
    for item in items:
        for name in str(item).split("+"):
            name = name.strip()
            if not _RAW_NAME.match(name):
                raise SelectionError(
                    f"cofitune.modules: '{item}' is not a module name; use ffn, mha, ffn+mha or "
                    "sub-module names such as gate_proj or o_proj"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise SelectionError("cofitune.modules: empty; name at least one module, e.g. [ffn]")
    return names


def find_decoder_layers(model: nn.Module, num_layers: int) -> str:
    """Return the dotted name of the `ModuleList` that holds the model's `num_layers` blocks."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    if len(found) != 1:
        raise SelectionError(
            f"cofitune: expected exactly one list of {num_layers} decoder layers in "
            f"{type(model).__name__}, found {found or 'none'}"
        )
    return found[0]


@dataclass(frozen=True)
class Selection:
    """The parameters CoFiTune trains, in model order, with their element counts, and the
    model's architecture that soft masks need to lay importance over those parameters' rows."""

    layer_prefix: str
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    parameters: dict[str, int]
    model_type: str
    n_heads: int  # attention (query) heads per layer
    n_kv_heads: int  # key/value heads per layer: fewer than n_heads under GQA
    note: str = ""

    @property
    def numel(self) -> int:
        return sum(self.parameters.values())

    @property
    def architecture(self) -> Architecture:
        """Where the model keeps `ffn` and `mha`; refuses a `model_type` it does not know."""
        return architecture_for(self.model_type)

    def by_layer_and_module(self) -> dict[tuple[int, str], int]:
        """Element counts grouped by (layer index, module path inside the layer)."""
        counts: dict[tuple[int, str], int] = defaultdict(int)
        for name, numel in self.parameters.items():
            layer, path = split_layer_name(name, self.layer_prefix)
            counts[layer, path.removesuffix(".weight").removesuffix(".bias")] += numel
        return dict(counts)

    def unfrozen_parameters(self) -> list[str]:
        """Regexes in Axolotl's `unfrozen_parameters` dialect (a `.` means a literal dot)."""
        layers_of: dict[str, list[int]] = defaultdict(list)
        for name in self.parameters:
            layer, path = split_layer_name(name, self.layer_prefix)
            layers_of[path].append(layer)
        return [
            f"^{self.layer_prefix}.({'|'.join(map(str, layers))}).{path}$"
            for path, layers in layers_of.items()
        ]

    def report(self, total_numel: int) -> str:
        """A table of what is trained, per layer and module, as a share of the whole model."""
        rows = [f"{'layer':>5}  {'module':<32} {'params':>14} {'% model':>8}"]
        for (layer, path), numel in self.by_layer_and_module().items():
            rows.append(f"{layer:>5}  {path:<32} {numel:>14,} {100 * numel / total_numel:>7.2f}%")
        rows.append(
            f"{'total':>5}  {'':<32} {self.numel:>14,} {100 * self.numel / total_numel:>7.2f}%"
        )
        head = (
            f"CoFiTune trains layers {compact_layers(self.layers)} ({len(self.layers)} of the "
            f"model's '{self.layer_prefix}'), modules {'+'.join(self.modules)}"
        )
        return "\n".join([head, *([self.note] if self.note else []), *rows])


def select(model: nn.Module, layers: str | int | list[int], modules: str | list[str]) -> Selection:
    """Resolve a layer spec and module names into the exact parameters of `model` to train.

    The model's own config (`model.config`, its text part for a multimodal model) names its
    architecture, depth and attention heads, so no caller can pass ones that do not match it.
    """
    config = model.config.get_text_config()
    model_type, num_layers = config.model_type, config.num_hidden_layers
    layer_indices = resolve_layers(layers, num_layers)
    module_names = parse_modules(modules)
    prefix = find_decoder_layers(model, num_layers)
    wanted = set(layer_indices)

    paths: list[str] = []
    raw_names: list[str] = []
    notes: list[str] = []
    for name in module_names:
        if name in MODULE_SETS:
            architecture = architecture_for(model_type)
            paths += architecture.module_set(name)
            if architecture.note and architecture.note not in notes:
                notes.append(architecture.note)
        else:
            raw_names.append(name)

    parameters: dict[str, int] = {}
    used: set[str] = set()
    layer_parts: set[str] = set()
    for name, param in model.named_parameters():
        if not name.startswith(prefix + "."):
            continue
        layer, path = split_layer_name(name, prefix)
        if layer not in wanted:
            continue
        parts = path.split(".")
        layer_parts.update(parts[:-1])
        hits = [p for p in paths if path == p or path.startswith(p + ".")]
        hits += [r for r in raw_names if r in parts]
        if hits:
            used.update(hits)
            parameters[name] = getattr(param, "ds_numel", param.numel())

    missing = [m for m in paths + raw_names if m not in used]
    if missing:
        raise SelectionError(
            f"cofitune.modules: {missing} match no parameter in layers "
            f"{compact_layers(layer_indices)} "
            f"of this {model_type} model; its layers contain: {', '.join(sorted(layer_parts))}"
        )
    return Selection(
        layer_prefix=prefix,
        layers=tuple(layer_indices),
        modules=tuple(module_names),
        parameters=parameters,
        model_type=model_type,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        note=" ".join(notes),
    )


def split_layer_name(name: str, prefix: str) -> tuple[int, str]:
    """`model.layers.7.mlp.up_proj.weight` -> (7, `mlp.up_proj.weight`)."""
    index, _, path = name[len(prefix) + 1 :].partition(".")
    return int(index), path


def compact_layers(layers: tuple[int, ...] | list[int]) -> str:
    """`[7, 8, 9, 12]` -> `7-9,12`, for messages and reports."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
