"""The fine level's control: a permuted importance keeps each layer's mask strength, loses which
unit is which, and loads for training as the importance it came from."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from methods import all_methods  # noqa: E402
from permuted import permuted, write_permuted  # noqa: E402

from cofitune_plugin.architectures import architecture_for  # noqa: E402
from cofitune_plugin.importance import RawImportance  # noqa: E402
from cofitune_plugin.importance_store import (  # noqa: E402
    load_importance,
    model_manifest,
    save_importance,
)
from helpers import tiny_model  # noqa: E402


def _raw() -> RawImportance:
    generator = torch.Generator().manual_seed(0)
    return RawImportance(
        head=torch.rand(4, 8, generator=generator),
        intermediate=torch.rand(4, 64, generator=generator),
        output=torch.rand(4, 32, generator=generator),
        tokens=100,
        estimator="activation",
    )


def test_each_layer_keeps_its_values_on_other_units():
    raw = _raw()
    shuffled = permuted(raw, seed=0)
    for unit, scores in raw.tensors().items():
        moved = shuffled.tensors()[unit]
        for layer, layer_moved in zip(scores, moved, strict=True):
            assert torch.equal(layer.sort().values, layer_moved.sort().values)
            assert not torch.equal(layer, layer_moved)
    assert torch.equal(permuted(raw, seed=0).intermediate, shuffled.intermediate)
    assert not torch.equal(permuted(raw, seed=1).intermediate, shuffled.intermediate)


def test_the_copy_loads_for_the_same_model_says_it_is_a_control_and_is_never_replaced(tmp_path):
    model = tiny_model("llama")
    manifest = model_manifest(model, architecture_for("llama"), "model.layers")
    raw = RawImportance(
        head=torch.rand(8, 4), intermediate=torch.rand(8, 64), output=torch.rand(8, 32),
        tokens=10, estimator="activation",
    )  # fmt: skip
    save_importance(raw, tmp_path / "importance", manifest)
    write_permuted(tmp_path / "importance", tmp_path / "control")

    source = load_importance([tmp_path / "importance"], manifest, "activation")
    control = load_importance([tmp_path / "control"], manifest, "activation")
    for unit in ("head", "intermediate", "output"):
        ours, theirs = getattr(source, unit), getattr(control, unit)
        assert torch.equal(ours.sort(dim=1).values, theirs.sort(dim=1).values)  # same strength
        assert not torch.equal(ours, theirs)
    written = json.loads((tmp_path / "control" / "manifest.json").read_text())
    assert written["control"].startswith("values permuted within each layer")
    with pytest.raises(FileExistsError):
        write_permuted(tmp_path / "importance", tmp_path / "control", seed=1)


def test_only_the_control_trains_with_the_permuted_copy(tmp_path):
    methods = {m.name: m for m in all_methods()}
    assert methods["cofitune-default-permuted"].importance(tmp_path) == (
        tmp_path / "importance-permuted"
    )
    assert methods["cofitune-default"].importance(tmp_path) == tmp_path / "importance"
    default = methods["cofitune-default"]
    assert (default.layers, default.soft_mask, default.default_recipe) == ("search", "update", True)
