"""The stored importance: save/load round trip, combining runs, manifest checks, fingerprints."""

import json

import pytest
import torch

from cofitune_plugin.architectures import architecture_for
from cofitune_plugin.importance import ImportanceError, RawImportance
from cofitune_plugin.importance_store import (
    data_fingerprint,
    load_importance,
    model_fingerprint,
    model_manifest,
    save_importance,
)
from cofitune_plugin.softmask import normalize
from helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def manifest_of(model, model_type: str) -> dict:
    """The manifest of a tiny model whose decoder layers are `model.layers` (llama, qwen2...)."""
    return model_manifest(model, architecture_for(model_type), "model.layers")


def fake_raw(seed: int, tokens: int = 10) -> RawImportance:
    generator = torch.Generator().manual_seed(seed)
    return RawImportance(
        head=torch.randn(8, 4, generator=generator),
        intermediate=torch.randn(8, 64, generator=generator),
        output=torch.randn(8, 32, generator=generator),
        tokens=tokens,
        estimator="das",
    )


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama")
    manifest = manifest_of(model, "llama")
    raw = fake_raw(seed=0)
    save_importance(raw, tmp_path / "run", {**manifest, "model": "tiny", "dropout": 0.003})

    written = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert written["tokens"] == 10 and written["model"] == "tiny"
    assert written["shapes"] == {"head": [8, 4], "intermediate": [8, 64], "output": [8, 32]}
    assert written["plugin_version"] == "0.1.0"
    loaded = load_importance([tmp_path / "run"], expected=manifest, estimator="das")
    assert torch.equal(loaded.head, normalize(raw.head))
    assert torch.equal(loaded.intermediate, normalize(raw.intermediate))
    assert torch.equal(loaded.output, normalize(raw.output))


def test_two_runs_combine_by_elementwise_max(tmp_path):
    manifest = manifest_of(tiny_model("llama"), "llama")
    first, second = fake_raw(seed=1), fake_raw(seed=2)
    save_importance(first, tmp_path / "a", manifest)
    save_importance(second, tmp_path / "b", manifest)
    combined = load_importance([tmp_path / "a", tmp_path / "b"], expected=manifest, estimator="das")
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
        load_importance([tmp_path / "run"], expected=expected, estimator="das")
    assert repr(manifest[field]) in str(err.value)
    assert repr(expected[field]) in str(err.value)
    assert "axolotl cofitune-importance" in str(err.value)


@pytest.mark.parametrize("measured", ["activation", None])
def test_an_importance_of_another_estimator_is_refused_naming_both(tmp_path, measured):
    """Scores of two estimators do not mean the same thing; a manifest written before
    estimators were recorded (no `estimator`) is refused too."""
    manifest = manifest_of(tiny_model("llama"), "llama")
    raw = fake_raw(seed=0)
    if measured:
        raw.estimator = measured
    save_importance(raw, tmp_path / "run", manifest)
    if measured is None:  # as an older plugin wrote it
        path = tmp_path / "run" / "manifest.json"
        written = json.loads(path.read_text())
        del written["estimator"], written["normalization"]
        path.write_text(json.dumps(written))
    with pytest.raises(ImportanceError, match="cofitune.soft_mask.estimator is 'fisher'") as err:
        load_importance([tmp_path / "run"], expected=manifest, estimator="fisher")
    assert f"estimator {measured or '<none recorded>'!r}" in str(err.value)
    assert "axolotl cofitune-importance" in str(err.value)


def test_a_non_negative_estimator_loads_rank_normalised(tmp_path):
    manifest = manifest_of(tiny_model("llama"), "llama")
    raw = fake_raw(seed=3)
    raw = RawImportance(
        **{k: v.abs() for k, v in raw.tensors().items()}, tokens=10, estimator="activation"
    )
    save_importance(raw, tmp_path / "run", manifest)
    written = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (written["estimator"], written["normalization"]) == ("activation", "rank")
    loaded = load_importance([tmp_path / "run"], expected=manifest, estimator="activation")
    assert torch.equal(loaded.intermediate, normalize(raw.intermediate, "rank"))


def test_a_missing_manifest_is_refused(tmp_path):
    with pytest.raises(ImportanceError, match="has no manifest.json"):
        load_importance([tmp_path], expected={"model_type": "llama"}, estimator="das")


def test_an_existing_importance_is_not_overwritten(tmp_path):
    manifest = {"model_type": "llama"}
    save_importance(fake_raw(seed=0), tmp_path, manifest)
    with pytest.raises(FileExistsError, match="already holds an importance"):
        save_importance(fake_raw(seed=1), tmp_path, manifest)
    save_importance(fake_raw(seed=1), tmp_path, manifest, overwrite=True)
    loaded = load_importance([tmp_path], expected=manifest, estimator="das")
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
