"""`axolotl cofitune-importance` through the real Axolotl CLI."""

import json

from safetensors.torch import load_file

from conftest import recipe, run_axolotl, soft_mask_block, write_recipe


def test_importance_command_writes_tensors_and_manifest(llama_importance):
    tensors = load_file(llama_importance / "importance.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "head": (8, 4),
        "intermediate": (8, 64),
        "output": (8, 32),
    }
    assert all(v.abs().sum() > 0 for v in tensors.values())
    manifest = json.loads((llama_importance / "manifest.json").read_text())
    assert manifest["model_type"] == "llama"
    assert manifest["num_layers"] == 8 and manifest["n_heads"] == 4
    assert manifest["tokens"] > 0 and manifest["sequence_len"] == 64
    assert len(manifest["fingerprint"]) == 64 and len(manifest["data_fingerprint"]) == 64


def test_importance_command_never_overwrites_an_existing_result(tmp_path, tiny_models):
    importance = tmp_path / "importance"
    importance.mkdir()
    (importance / "manifest.json").write_text("{}")
    cfg = recipe(tmp_path, tiny_models["llama"], cofitune=soft_mask_block(importance))
    result = run_axolotl("cofitune-importance", str(write_recipe(tmp_path, cfg)), cwd=tmp_path)
    assert result.returncode != 0
    assert "already holds an importance; pass --overwrite" in result.stderr
    assert (importance / "manifest.json").read_text() == "{}"


def test_importance_command_needs_a_soft_mask_block(tmp_path, tiny_models):
    cfg = recipe(tmp_path, tiny_models["llama"])
    result = run_axolotl("cofitune-importance", str(write_recipe(tmp_path, cfg)), cwd=tmp_path)
    assert result.returncode != 0
    assert "needs `cofitune.soft_mask.importance: DIR`" in result.stderr
