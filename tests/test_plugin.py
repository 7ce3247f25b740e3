"""The plugin inside real Axolotl: `axolotl train` trains exactly the selection, bad recipes stop
at config time, and a recipe whose plugin did not load never becomes a full fine-tune."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from axolotl.cli.config import load_cfg
from axolotl.utils.dict import DictDefault
from pydantic import ValidationError
from safetensors.torch import load_file

from cofitune_plugin.plugin import REWRITTEN_KEYS, CoFiTunePlugin
from cofitune_plugin.search import CHOSEN_FILE
from helpers import (
    AXOLOTL_VERSION,
    OFFLINE_ENV,
    expected_row_keep,
    masked_and_plain_step,
    recipe,
    run_axolotl,
    search_block,
    soft_mask_block,
    write_recipe,
)

EXPECTED_TRAINED = {
    "llama": {f"model.layers.{i}.mlp.{m}.weight" for i in (2, 3) for m in ("up_proj", "down_proj")},
    "gpt_neox": {
        f"gpt_neox.layers.{i}.mlp.{m}.{p}"
        for i in (2, 3)
        for m in ("dense_h_to_4h", "dense_4h_to_h")
        for p in ("weight", "bias")
    },
    # Checkpoints store experts one by one; in memory they are fused (gate+up), so `ffn` trains
    # every expert's gate rows too (see architectures.py), and the router stays frozen.
    "qwen2_moe": {
        f"model.layers.{i}.mlp.experts.{e}.{m}.weight"
        for i in (2, 3)
        for e in range(4)
        for m in ("gate_proj", "up_proj", "down_proj")
    }
    | {
        f"model.layers.{i}.mlp.shared_expert.{m}.weight"
        for i in (2, 3)
        for m in ("up_proj", "down_proj")
    },
}


@pytest.mark.axolotl
@pytest.mark.parametrize("model_type", sorted(EXPECTED_TRAINED))
def test_axolotl_train_changes_exactly_the_selected_parameters(tmp_path, tiny_models, model_type):
    cfg_path = write_recipe(tmp_path, recipe(tmp_path, tiny_models[model_type]))
    result = run_axolotl("train", str(cfg_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "CoFiTune trains layers 2-3" in result.stdout + result.stderr

    before = load_file(tiny_models[model_type] / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == EXPECTED_TRAINED[model_type]


def _load(tmp_path: Path, model_dir: Path, **overrides):
    return load_cfg(str(write_recipe(tmp_path, recipe(tmp_path, model_dir, **overrides))))


def test_recipe_resolves_to_axolotl_unfrozen_parameters(tmp_path, tiny_models):
    cfg = _load(tmp_path, tiny_models["llama"], cofitune={"layers": "2-3", "modules": ["ffn"]})
    assert cfg.adapter == "cofitune"
    assert cfg.cofitune["layers"] == "2-3"
    assert sorted(cfg.unfrozen_parameters) == [
        "^model.layers.(2|3).mlp.down_proj.weight$",
        "^model.layers.(2|3).mlp.up_proj.weight$",
    ]


def test_empty_block_means_the_papers_selection(tmp_path, tiny_models):
    cfg = _load(tmp_path, tiny_models["llama"], cofitune={})
    assert "^model.layers.(2|3).mlp.up_proj.weight$" in cfg.unfrozen_parameters


BAD_RECIPES = {
    "window out of range": (
        {"cofitune": {"layers": "6-9"}},
        "cofitune.layers: '6-9' reaches layer 9, but the model has 8 layers",
    ),
    "empty window": ({"cofitune": {"layers": "0%-10%"}}, "selects no layer of a 8-layer model"),
    "unknown module": ({"cofitune": {"modules": ["w1"]}}, "cofitune.modules: ['w1'] match no"),
    "misspelt key": ({"cofitune": {"layer": "25%-50%"}}, "cofitune.layer: Extra inputs"),
    "bad apply_to": (
        {"cofitune": {"soft_mask": {"importance": "x", "apply_to": "weights"}}},
        "cofitune.soft_mask.apply_to",
    ),
    "user unfrozen_parameters": (
        {"unfrozen_parameters": ["^lm_head.weight$"]},
        "remove `unfrozen_parameters`",
    ),
    "no adapter line": ({"adapter": None}, "needs `adapter: cofitune`"),
    "adapter without block": ({"cofitune": None}, "adapter: cofitune needs a `cofitune:` block"),
    "preference training": ({"rl": "dpo"}, "remove `rl`"),
    "8-bit weights": ({"load_in_8bit": True}, "remove `load_in_8bit`"),
    "4-bit weights": ({"load_in_4bit": True}, "use `adapter: cofitune-qlora`"),
    "fsdp1": ({"fsdp_config": {"fsdp_version": 1}}, "set `fsdp_version: 2`"),
    "spectrum too": (
        {
            "plugins": [
                "cofitune_plugin.CoFiTunePlugin",
                "axolotl.integrations.spectrum.SpectrumPlugin",
            ],
            "spectrum_top_fraction": 0.5,
        },
        "plugins: axolotl.integrations.spectrum.SpectrumPlugin (Spectrum) and `cofitune:` both "
        "choose what trains",
    ),
    "importance not computed yet": (
        {"cofitune": {"soft_mask": {"importance": "nowhere"}}},
        "cofitune.soft_mask.importance: no importance in ['nowhere']; compute it first",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_fail_at_config_time_with_the_key_and_fix(tmp_path, tiny_models, case):
    overrides, message = BAD_RECIPES[case]
    with pytest.raises(ValueError) as err:
        _load(tmp_path, tiny_models["llama"], **overrides)
    assert message in str(err.value)


def test_unmapped_architecture_is_refused_by_model_type(tmp_path):
    model_dir = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=8, n_embd=32, n_head=4, vocab_size=320)).save_pretrained(
        model_dir
    )
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        _load(tmp_path, model_dir)
    cfg = _load(tmp_path, model_dir, cofitune={"modules": ["c_fc"]})
    assert cfg.unfrozen_parameters == [
        "^transformer.h.(2|3).mlp.c_fc.weight$",
        "^transformer.h.(2|3).mlp.c_fc.bias$",
    ]


@pytest.mark.parametrize("case", ["cofitune", "cofitune-lora", "from_search"])
def test_a_config_axolotl_rejects_is_left_as_the_user_wrote_it(tmp_path, tiny_models, case):
    """`register` rewrites the recipe (`unfrozen_parameters`, `adapter: lora`, the search's
    choice) before Axolotl validates it. When Axolotl then rejects the config, the caller's dict
    must be as the user wrote it, so that loading it again, corrected, is judged on that."""
    search = tmp_path / "search"
    search.mkdir()
    (search / CHOSEN_FILE).write_text(yaml.safe_dump({"layers": "2-3", "modules": ["mha"]}))
    block = {"from_search": str(search)} if case == "from_search" else {}
    adapter = "cofitune-lora" if case == "cofitune-lora" else "cofitune"
    cfg = DictDefault(
        recipe(
            tmp_path,
            tiny_models["llama"],
            adapter=adapter,
            cofitune=block,
            warmup_steps=1,
            warmup_ratio=0.1,  # Axolotl's validation: mutually exclusive with warmup_steps
        )
    )
    written = {key: copy.deepcopy(cfg.get(key)) for key in REWRITTEN_KEYS}
    with pytest.raises(ValidationError, match="warmup_steps and warmup_ratio are mutually"):
        load_cfg(cfg)
    assert {key: cfg.get(key) for key in REWRITTEN_KEYS} == written

    del cfg["warmup_ratio"]
    loaded = load_cfg(cfg)
    assert loaded.adapter == {"cofitune-lora": "lora"}.get(case, "cofitune")
    trained = loaded.lora_target_modules or "".join(loaded.unfrozen_parameters)
    assert ("q_proj" if case == "from_search" else "up_proj") in trained


def test_a_search_choice_the_plugin_refuses_is_read_again_once_corrected(tmp_path, tiny_models):
    """`register` writes the search's choice into the block, then resolves it; when that fails,
    the block must still name the search, so that the corrected choice is what loads next."""
    search = tmp_path / "search"
    search.mkdir()
    (search / CHOSEN_FILE).write_text(yaml.safe_dump({"layers": "2-3", "modules": ["w1"]}))
    cfg = DictDefault(recipe(tmp_path, tiny_models["llama"], cofitune={"from_search": str(search)}))
    written = {key: copy.deepcopy(cfg.get(key)) for key in REWRITTEN_KEYS}
    with pytest.raises(ValueError, match=r"cofitune.modules: \['w1'\] match no parameter"):
        load_cfg(cfg)
    assert {key: cfg.get(key) for key in REWRITTEN_KEYS} == written

    (search / CHOSEN_FILE).write_text(yaml.safe_dump({"layers": "2-3", "modules": ["mha"]}))
    assert "q_proj" in "".join(load_cfg(cfg).unfrozen_parameters)


@pytest.mark.axolotl
@pytest.mark.parametrize(
    "plugins",
    [["cofitune_plugin_not_installed.CoFiTunePlugin"], None],
    ids=["plugin-import-fails", "plugin-line-missing"],
)
def test_recipe_without_a_working_plugin_never_trains(tmp_path, tiny_models, plugins):
    cfg = recipe(tmp_path, tiny_models["llama"], plugins=plugins)
    result = run_axolotl("train", str(write_recipe(tmp_path, cfg)), cwd=tmp_path)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    if plugins and AXOLOTL_VERSION >= (0, 21):  # 0.21 raises on a listed plugin's import error
        assert "No module named 'cofitune_plugin_not_installed'" in log
    else:  # 0.19 skips it; then the adapter no plugin registered stops the run
        assert "Adapter 'cofitune' is not built in" in log
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_register_forgets_the_previous_training(tmp_path, tiny_models):
    """Axolotl 0.21 keeps one plugin instance from one `load_cfg` to the next: what it
    remembers of a training (when its trainer was made, that its report was written) must not
    carry into the next one, or the second training in a process would write no report."""
    plugin = CoFiTunePlugin()
    plugin._trainer_created, plugin._reported = 1.0, True
    plugin.register(DictDefault(recipe(tmp_path, tiny_models["llama"])))
    assert (plugin._trainer_created, plugin._reported) == (None, False)


@pytest.mark.axolotl
def test_two_trainings_in_one_process_each_write_their_report(tmp_path, tiny_models):
    """Axolotl's own `load_cfg` + `train` twice in one Python process (a notebook, a sweep):
    each training writes its own report, under 0.19 (a new plugin per config) and 0.21 (one
    plugin for the process)."""
    paths = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        block = {"layers": "25%-50%", "modules": ["ffn"], "report": {}}
        block["search"] = search_block(tmp_path / name)["search"]
        cfg = recipe(tmp_path / name, tiny_models["llama"], cofitune=block)
        paths.append(str(write_recipe(tmp_path / name, cfg)))
    script = (
        "import sys\n"
        "from axolotl.cli.config import load_cfg\n"
        "from axolotl.common.datasets import load_datasets\n"
        "from axolotl.train import train\n"
        "for path in sys.argv[1:]:\n"
        "    cfg = load_cfg(path)\n"
        "    train(cfg=cfg, dataset_meta=load_datasets(cfg=cfg))\n"
    )
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, *paths],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("first", "second"):
        assert (tmp_path / name / "out" / "cofitune-report.json").is_file(), name


@pytest.mark.axolotl
@pytest.mark.parametrize(
    ("apply_to", "optimizer"), [("update", "adamw_torch"), ("gradient", "sgd")]
)
def test_soft_mask_scales_each_rows_change_by_one_minus_importance(
    tmp_path, tiny_models, llama_importance, apply_to, optimizer
):
    """One step through `axolotl train`, masked and unmasked from the same state: every selected
    row moves by exactly (1 - I) times the unmasked move. `update` mode holds this for AdamW;
    `gradient` mode for plain SGD (no momentum, no weight decay, no clipping), where the step is
    linear in the gradient."""
    base = load_file(tiny_models["llama"] / "model.safetensors")
    outputs = masked_and_plain_step(
        tmp_path, tiny_models["llama"], llama_importance, apply_to, optimizer
    )
    deltas = {}
    for masked, out in outputs.items():
        after = load_file(out / "model.safetensors")
        deltas[masked] = {name: after[name] - base[name] for name in base}

    for layer in (2, 3):
        prefix = f"model.layers.{layer}"
        for module, rows in expected_row_keep(llama_importance, layer).items():
            name = f"{prefix}.{module}.weight"
            torch.testing.assert_close(
                deltas[True][name], rows[:, None] * deltas[False][name], rtol=1e-4, atol=1e-7
            )
            assert deltas[False][name].abs().sum() > 0
    untouched = [n for n in base if not n.startswith(("model.layers.2.", "model.layers.3."))]
    assert all(torch.equal(deltas[True][n], deltas[False][n]) for n in untouched)


@pytest.mark.axolotl
def test_resuming_from_a_checkpoint_continues_the_masked_run_exactly(
    tmp_path, tiny_models, llama_importance
):
    """Soft-masked AdamW for 4 steps, checkpointing at step 2; a second run resumed from that
    checkpoint ends bitwise where the first did: the checkpoint keeps the frozen weights and the
    optimizer state, and the masks come back the same."""
    finals = {}
    for run in ("straight", "resumed"):
        run_dir = tmp_path / run
        run_dir.mkdir()
        overrides = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}
        if run == "resumed":
            overrides = {
                "max_steps": 4,
                "resume_from_checkpoint": str(tmp_path / "straight" / "out" / "checkpoint-2"),
            }
        cfg = recipe(
            run_dir, tiny_models["llama"], cofitune=soft_mask_block(llama_importance), **overrides
        )
        result = run_axolotl("train", str(write_recipe(run_dir, cfg)), cwd=run_dir)
        assert result.returncode == 0, result.stderr[-4000:]
        finals[run] = load_file(run_dir / "out" / "model.safetensors")

    base = load_file(tiny_models["llama"] / "model.safetensors")
    checkpoint = load_file(tmp_path / "straight" / "out" / "checkpoint-2" / "model.safetensors")
    trained = {n for n in base if n.startswith(("model.layers.2.", "model.layers.3."))}
    trained &= {n for n in base if any(m in n for m in ("up_proj", "down_proj", "q_", "k_", "v_"))}
    for name in base:
        if name in trained:
            assert not torch.equal(checkpoint[name], base[name]), name
            assert not torch.equal(finals["straight"][name], checkpoint[name]), name
        else:
            assert torch.equal(checkpoint[name], base[name]), name
        assert torch.equal(finals["resumed"][name], finals["straight"][name]), name


@pytest.mark.parametrize("apply_to", ["gradient", "update"])
def test_soft_mask_acts_only_while_training(apply_to):
    """The plugin's callback masks from `on_train_begin` to `on_train_end` and not after, so an
    evaluation or a second trainer on the same model (the search, the benchmarks) is unmasked."""
    from cofitune_plugin.plugin import _SoftMaskDuringTraining

    model = torch.nn.Linear(4, 3)
    keep = torch.tensor([0.0, 0.5, 1.0])  # kept fraction per row: 1 - importance
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    callback = _SoftMaskDuringTraining({"weight": keep}, apply_to=apply_to)

    def change() -> torch.Tensor:  # the gradient of this loss is 2 everywhere, whatever the weights
        before = model.weight.detach().clone()
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        return model.weight.detach() - before

    callback.on_train_begin(None, None, None, model=model, optimizer=optimizer)
    masked = change()
    callback.on_train_end(None, None, None)
    unmasked = change()
    assert torch.allclose(unmasked, torch.full((3, 4), -2.0))
    assert torch.allclose(masked, unmasked * keep[:, None])
