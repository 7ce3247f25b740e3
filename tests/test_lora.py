"""LoRA and QLoRA on the selection: adapters on exactly the selected modules (plain PEFT, then a
real `axolotl train`, 4-bit through bitsandbytes' CPU backend), soft masks on `lora_B` rows, and
recipes that would put adapters elsewhere refused."""

import json
from pathlib import Path

import pytest
import torch
from axolotl.cli.config import load_cfg
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from cofitune_plugin.importance_store import model_fingerprint
from cofitune_plugin.lora import lora_b_masks, lora_parameters, target_modules_regex
from cofitune_plugin.selection import SelectionError, select
from helpers import (
    AXOLOTL_VERSION,
    expected_row_keep,
    masked_and_plain_step,
    recipe,
    run_axolotl,
    tiny_model,
    write_recipe,
)

LORA = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
SELECTED = [f"model.layers.{i}.mlp.{m}" for i in (2, 3) for m in ("up_proj", "down_proj")]


def _selection(model, modules=("ffn",)):
    return select(model, "25%-50%", list(modules))


def test_target_regex_puts_adapters_on_exactly_the_selected_modules():
    model = tiny_model("llama")
    selection = _selection(model)
    regex = target_modules_regex(selection, model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=regex))
    base = peft_model.get_base_model()
    adapted = [n for n, m in base.named_modules() if hasattr(m, "lora_B")]
    assert adapted == SELECTED
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable == lora_parameters(base, selection)
    assert trainable == [f"{m}.lora_{ab}.default.weight" for m in SELECTED for ab in "AB"]


def test_lora_b_takes_the_weights_row_mask_and_biases_are_dropped():
    model = tiny_model("qwen2")  # q/k/v have biases
    selection = _selection(model, ["mha"])
    base = get_peft_model(
        model, LoraConfig(r=4, target_modules=target_modules_regex(selection, model))
    ).get_base_model()
    masks = {name: torch.rand(base.get_parameter(name).shape[0]) for name in selection.parameters}
    lora_masks = lora_b_masks(base, masks)
    assert len(masks) == 12 and len(lora_masks) == 6
    for name, mask in masks.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight":
            assert lora_masks[f"{module}.lora_B.default.weight"] is mask
            assert base.get_parameter(f"{module}.lora_B.default.weight").shape[0] == len(mask)


def test_adapters_do_not_change_the_base_models_fingerprint():
    """Importance made on the base model must match a LoRA run on it."""
    fingerprint = model_fingerprint(tiny_model("llama"))
    model = tiny_model("llama")
    regex = target_modules_regex(_selection(model), model)
    assert model_fingerprint(get_peft_model(model, LoraConfig(r=4, target_modules=regex))) == (
        fingerprint
    )


def test_fused_moe_experts_are_refused():
    model = tiny_model("qwen2_moe")
    with pytest.raises(SelectionError, match="fused tensor .* use `adapter: cofitune`"):
        target_modules_regex(_selection(model), model)


@pytest.mark.axolotl
@pytest.mark.parametrize("adapter", ["cofitune-lora", "cofitune-qlora"])
def test_axolotl_train_trains_only_the_adapters_of_the_selection(tmp_path, tiny_models, adapter):
    quantized = adapter == "cofitune-qlora"
    cfg = recipe(tmp_path, tiny_models["llama"], adapter=adapter, load_in_4bit=quantized, **LORA)
    result = run_axolotl("train", str(write_recipe(tmp_path, cfg)), cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-4000:]

    # 2 layers x (up + down) x r * (32 + 64); PEFT counts every trainable tensor of the model,
    # so the base weights were frozen; the plugin then checked the exact tensors.
    assert "trainable params: 1,536 ||" in log
    assert "training only the LoRA adapters of these modules: 1,536 parameters" in log
    # Axolotl's 4-bit path (0.21 also names the function when it patches it, for any LoRA)
    assert ("converting PEFT model w/ prepare_model_for_kbit_training" in log) == quantized
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == (
        r"model\.layers\.(2|3)\.mlp\.up_proj|model\.layers\.(2|3)\.mlp\.down_proj"
    )
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    weights = load_file(out / "adapter_model.safetensors")
    names = [f"base_model.model.{m}.lora_{ab}.weight" for m in SELECTED for ab in "AB"]
    assert set(weights) == set(names)
    # lora_B starts at zero: every adapter was trained
    assert all(weights[name].abs().sum() > 0 for name in names if ".lora_B." in name)


def _initial_adapter(path: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """A saved LoRA adapter on the soft-mask selection (ffn+mha of layers 2-3) with non-zero
    lora_B, so both runs start from the same adapter (Axolotl 0.19 does not seed LoRA init) and
    lora_A moves in the first step too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    targets = r"model\.layers\.(2|3)\.(mlp\.(up|down)_proj|self_attn\.[qkv]_proj)"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(
            r=LORA["lora_r"],
            lora_alpha=LORA["lora_alpha"],
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.data.normal_(std=0.1)
    model.save_pretrained(path)
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.axolotl
@pytest.mark.parametrize(
    ("apply_to", "optimizer"), [("update", "adamw_torch"), ("gradient", "sgd")]
)
def test_soft_mask_scales_each_lora_b_row_by_one_minus_importance(
    tmp_path, tiny_models, llama_importance, apply_to, optimizer
):
    """One LoRA step, masked and unmasked from the same adapter: each lora_B row moves by exactly
    (1 - I) times its unmasked move (AdamW with `update` masks, plain SGD with `gradient` masks),
    and lora_A, unmasked, moves the same in both runs."""
    before = _initial_adapter(tmp_path / "initial", tiny_models["llama"])
    outputs = masked_and_plain_step(
        tmp_path,
        tiny_models["llama"],
        llama_importance,
        apply_to,
        optimizer,
        adapter="cofitune-lora",
        lora_model_dir=str(tmp_path / "initial"),
        **LORA,
    )
    deltas = {}
    for masked, out in outputs.items():
        after = load_file(out / "adapter_model.safetensors")
        assert after.keys() == before.keys()
        deltas[masked] = {name: after[name] - before[name] for name in before}

    for layer in (2, 3):
        for module, rows in expected_row_keep(llama_importance, layer).items():
            lora = f"base_model.model.model.layers.{layer}.{module}.lora_"
            plain, masked = deltas[False][f"{lora}B.weight"], deltas[True][f"{lora}B.weight"]
            assert plain.abs().sum() > 0
            torch.testing.assert_close(masked, rows[:, None] * plain, rtol=1e-4, atol=1e-7)
            assert deltas[False][f"{lora}A.weight"].abs().sum() > 0
            torch.testing.assert_close(
                deltas[True][f"{lora}A.weight"], deltas[False][f"{lora}A.weight"]
            )


def _load(tmp_path: Path, model_dir: Path, **overrides):
    return load_cfg(str(write_recipe(tmp_path, recipe(tmp_path, model_dir, **overrides))))


def test_qlora_recipe_becomes_axolotls_qlora_on_the_selection(tmp_path, tiny_models):
    cfg = _load(tmp_path, tiny_models["llama"], adapter="cofitune-qlora", load_in_4bit=True, **LORA)
    assert (cfg.adapter, cfg.load_in_4bit, cfg.lora_r, cfg.lora_alpha) == ("qlora", True, 4, 8)
    assert cfg.lora_target_modules == (
        r"model\.layers\.(2|3)\.mlp\.up_proj|model\.layers\.(2|3)\.mlp\.down_proj"
    )
    assert not cfg.unfrozen_parameters


BAD_RECIPES = {
    "user lora_target_modules": (
        {"adapter": "cofitune-lora", "lora_target_modules": ["q_proj"]},
        "`lora_target_modules` with adapter: cofitune-lora: the CoFiTune selection decides",
    ),
    "user lora_target_linear": (
        {"adapter": "cofitune-qlora", "load_in_4bit": True, "lora_target_linear": True},
        "remove `lora_target_linear` and choose them with `cofitune.layers`",
    ),
    "user peft_layers_to_transform": (
        {"adapter": "cofitune-lora", "peft_layers_to_transform": [1]},
        "remove `peft_layers_to_transform`",
    ),
    "plain lora adapter": (
        {"adapter": "lora"},
        "needs `adapter: cofitune` (found adapter: 'lora'): `cofitune` trains the selection's "
        "weights, `cofitune-lora` / `cofitune-qlora`",
    ),
    "plain qlora adapter": ({"adapter": "qlora", "load_in_4bit": True}, "found adapter: 'qlora'"),
    "qlora without 4-bit": (
        {"adapter": "cofitune-qlora"},
        "adapter: cofitune-qlora needs `load_in_4bit: true`",
    ),
    "lora with 4-bit": (
        {"adapter": "cofitune-lora", "load_in_4bit": True},
        "use `adapter: cofitune-qlora` for 4-bit QLoRA",
    ),
    "dora": ({"adapter": "cofitune-lora", "peft_use_dora": True}, "remove `peft_use_dora`"),
    "lora without block": (
        {"adapter": "cofitune-lora", "cofitune": None},
        "adapter: cofitune-lora needs a `cofitune:` block",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_lora_recipes_fail_at_config_time_with_the_key_and_fix(tmp_path, tiny_models, case):
    overrides, message = BAD_RECIPES[case]
    with pytest.raises(ValueError) as err:
        _load(tmp_path, tiny_models["llama"], **{**LORA, **overrides})
    assert message in str(err.value)


def test_lora_on_moe_experts_is_refused_at_config_time(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="is a fused tensor"):
        _load(tmp_path, tiny_models["qwen2_moe"], adapter="cofitune-lora", **LORA)


@pytest.mark.axolotl
def test_lora_recipe_without_a_working_plugin_never_trains(tmp_path, tiny_models):
    # Neither LoRA name is registered with Axolotl (the plugin renames them in `register`), so
    # both meet the same refusal; QLoRA is the one worth the subprocess.
    adapter = "cofitune-qlora"
    cfg = recipe(
        tmp_path,
        tiny_models["llama"],
        adapter=adapter,
        load_in_4bit=adapter == "cofitune-qlora",
        plugins=["cofitune_plugin_not_installed.CoFiTunePlugin"],
        **LORA,
    )
    result = run_axolotl("train", str(write_recipe(tmp_path, cfg)), cwd=tmp_path)
    assert result.returncode != 0
    # Axolotl 0.19 skips a plugin that fails to import (then refuses the adapter no plugin
    # registered); 0.21 raises the import error itself.
    refusal = (
        "No module named 'cofitune_plugin_not_installed'"
        if AXOLOTL_VERSION >= (0, 21)
        else f"Adapter '{adapter}' is not built in"
    )
    assert refusal in result.stdout + result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("adapter_*"))
