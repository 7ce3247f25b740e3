"""Every recipe under recipes/ passes Axolotl's own config loading, offline, and trains its window.

`load_cfg` is what `axolotl train`/`preprocess` run first: the plugin's `register` (which builds
the model on the meta device from its config and resolves the selection), Axolotl's validators,
and the launcher setup (DeepSpeed/FSDP environment). There is no model hub here, so each base
model is replaced by a directory holding its real published config.json (tests/model_configs/).
"""

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import PartialState
from axolotl.cli.config import load_cfg
from axolotl.utils import distributed
from axolotl.utils.dict import DictDefault
from axolotl.utils.freeze import LayerNamePattern
from transformers import AutoConfig, AutoModelForCausalLM

from cofitune_plugin.importance_store import MANIFEST_FILE
from cofitune_plugin.plugin import importance_dirs
from cofitune_plugin.search import CHOSEN_FILE

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yml"))
MODEL_CONFIGS = Path(__file__).parent / "model_configs"

# (model, cofitune.layers) -> the first and last layer the window must resolve to.
WINDOWS = {
    ("Llama-2-13b-chat-hf", "25%-50%"): (10, 19),
    ("Llama-2-7b-chat-hf", "25%-50%"): (8, 15),
    ("Llama-3.1-8B-Instruct", "25%-50%"): (8, 15),
    ("Llama-3.1-70B-Instruct", "25%-50%"): (20, 39),
    ("Qwen2.5-7B-Instruct", "25%-50%"): (7, 13),
    ("SmolLM2-135M-Instruct", "25%-50%"): (7, 14),
}
FFN = ("mlp.up_proj", "mlp.down_proj")


def _model_name(base_model: str) -> str:
    """The stored config standing in for `base_model` (matched on its last path part)."""
    wanted = Path(base_model).name.lower()
    names = [p.stem for p in MODEL_CONFIGS.glob("*.json") if p.stem.lower() == wanted]
    assert names, f"store {base_model}'s config.json as tests/model_configs/<name>.json"
    return names[0]


def _reset_launcher_state() -> None:
    """Forget the process-wide distributed state a DeepSpeed recipe's launcher setup creates."""
    distributed.distributed_state = None
    PartialState._reset_state()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """A run directory laid out like the repository root, in `axolotl preprocess` mode.

    Preprocess mode skips only the single-process NCCL init a DeepSpeed recipe triggers (it needs
    a GPU); the DeepSpeed config is still built. `load_cfg` exports ACCELERATE_*/FSDP_* variables
    and a process-wide PartialState: both are undone so that nothing leaks into later tests.
    """
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)  # output_dir/debug.log lands here, not in the repository
    environ = dict(os.environ)
    os.environ["AXOLOTL_IS_PREPROCESS"] = "1"
    _reset_launcher_state()
    yield tmp_path
    os.environ.clear()
    os.environ.update(environ)
    _reset_launcher_state()


def load_recipe(recipe: Path, workdir: Path) -> tuple[dict, DictDefault]:
    """The raw recipe and Axolotl's validated cfg, with the base model replaced by its config."""
    raw = yaml.safe_load(recipe.read_text())
    model_dir = workdir / "base_model"
    model_dir.mkdir(exist_ok=True)
    config = MODEL_CONFIGS / f"{_model_name(raw['base_model'])}.json"
    (model_dir / "config.json").write_text(config.read_text())
    soft_mask = (raw.get("cofitune") or {}).get("soft_mask")
    for directory in importance_dirs(soft_mask["importance"]) if soft_mask else []:
        # Made by `axolotl cofitune-importance` before training; register only checks it exists.
        (workdir / directory).mkdir(parents=True, exist_ok=True)
        (workdir / directory / MANIFEST_FILE).write_text("{}")
    if from_search := (raw.get("cofitune") or {}).get("from_search"):
        # Written by `axolotl cofitune-search`; here, the paper's selection stands in for it.
        (workdir / from_search).mkdir(parents=True, exist_ok=True)
        (workdir / from_search / CHOSEN_FILE).write_text("layers: 25%-50%\nmodules: ffn\n")
    search = (raw.get("cofitune") or {}).get("search")
    if search and "report" in raw["cofitune"]:
        # The report's data (the search's here), which register reads and checks: one row each.
        for data in (search["speciality"]["data"], search["versatility"]["prompts"]):
            (workdir / data).parent.mkdir(parents=True, exist_ok=True)
            (workdir / data).write_text('{"prompt": "What is 2 + 3?", "answer": "#### 5"}\n')
    cfg = load_cfg(str(recipe), base_model=str(model_dir), is_preprocess=True)
    if raw.get("deepspeed"):
        assert isinstance(cfg.deepspeed, dict), f"{raw['deepspeed']} did not load"
    return raw, cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_trains_the_expected_ffn_window(recipe: Path, workdir: Path):
    raw, cfg = load_recipe(recipe, workdir)
    assert raw["plugins"] == ["cofitune_plugin.CoFiTunePlugin"]
    # cofitune-lora/-qlora are handed to Axolotl as lora/qlora with the selection as targets
    assert cfg.adapter == {"cofitune-lora": "lora", "cofitune-qlora": "qlora"}.get(
        raw["adapter"], "cofitune"
    )
    block = cfg.cofitune  # with `from_search`, the chosen layers/modules written above
    model = _model_name(raw["base_model"])
    window = WINDOWS.get((model, block.get("layers", "25%-50%")))
    assert window and block.get("modules", ["ffn"]) in (["ffn"], "ffn"), (
        "a new selection: add its expected layers to WINDOWS and its modules here"
    )
    first, last = window

    config = MODEL_CONFIGS / f"{model}.json"
    dims = json.loads(config.read_text())
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
    if cfg.adapter == "cofitune":
        assert cfg.unfrozen_parameters, "the plugin did not hand Axolotl its selection"
        patterns = [LayerNamePattern(p) for p in cfg.unfrozen_parameters]  # Axolotl's matcher
        trained = {
            n: p for n, p in meta_model.named_parameters() if any(q.match(n) for q in patterns)
        }
    else:  # PEFT full-matches a string target against module names
        targets = re.compile(cfg.lora_target_modules)
        trained = {
            n: p
            for n, p in meta_model.named_parameters()
            if targets.fullmatch(n[: -len(".weight")])
        }
    assert set(trained) == {
        f"model.layers.{i}.{module}.weight" for i in range(first, last + 1) for module in FFN
    }
    assert sum(p.numel() for p in trained.values()) == (
        2 * dims["hidden_size"] * dims["intermediate_size"] * (last - first + 1)
    )


def test_the_qlora_recipe_loads_in_4bit_for_one_24gb_gpu(workdir: Path):
    raw, cfg = load_recipe(REPO / "recipes" / "cofitune-qlora-13b.yml", workdir)
    assert raw["base_model"] == "meta-llama/Llama-2-13b-chat-hf"
    assert (cfg.adapter, cfg.load_in_4bit, cfg.sequence_len) == ("qlora", True, 512)
    assert cfg.bf16 and cfg.gradient_checkpointing


SHARDED_WITH_SOFT_MASKS = (
    "cofitune-7b.yml",  # ZeRO-2
    "cofitune-13b.yml",  # ZeRO-3, the paper's setting
    "cofitune-qwen2.5-7b.yml",  # ZeRO-3
    "cofitune-llama3.1-8b-fsdp2.yml",
)


@pytest.mark.parametrize("name", SHARDED_WITH_SOFT_MASKS)
def test_the_sharded_recipes_train_the_fine_level(name: str, workdir: Path):
    """Soft masks run under FSDP2 and DeepSpeed ZeRO-2/3 (tests/test_sharded.py), so the
    sharded recipes carry them, and Axolotl's config loading keeps the block."""
    raw, cfg = load_recipe(REPO / "recipes" / name, workdir)
    assert raw.get("deepspeed") or raw.get("fsdp_version") == 2
    assert cfg.cofitune["soft_mask"]["importance"] == raw["cofitune"]["soft_mask"]["importance"]
    header = (REPO / "recipes" / name).read_text().split("base_model:")[0]
    assert f"axolotl cofitune-importance recipes/{name}" in header


def test_every_recipe_names_its_command_and_hardware():
    for recipe in RECIPES:
        header = recipe.read_text().split("base_model:")[0]
        assert f"recipes/{recipe.name}" in header, f"{recipe.name}: header lacks the command"
        assert "GPU" in header or "CPU" in header, f"{recipe.name}: header lacks the hardware"


DDP, ZERO3 = "cofitune-llama3.1-8b.yml", "cofitune-13b.yml"
BREAKAGES = {
    "missing DeepSpeed config": (
        ZERO3,
        {"deepspeed": "recipes/deepspeed/zero9.json"},
        "an existing deepspeed config",
    ),
    "window out of range": (DDP, {"cofitune": {"layers": "25%-150%"}}, "cofitune.layers"),
    # Axolotl's own validator, which fires because the plugin set `unfrozen_parameters`.
    "reentrant checkpointing": (
        DDP,
        {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
        "use_reentrant` must be false",
    ),
    "wrong type": (DDP, {"micro_batch_size": "four"}, "micro_batch_size"),
}


@pytest.mark.parametrize("recipe,change,message", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_a_broken_recipe_fails(workdir: Path, recipe: str, change: dict, message: str):
    raw = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    broken = workdir / "broken.yml"
    broken.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match=message):
        load_recipe(broken, workdir)
