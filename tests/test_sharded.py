"""Soft masks under FSDP2 and DeepSpeed ZeRO-2/3: `axolotl train` on 2 CPU processes over gloo
trains what one process trains.

The CPU launch of FSDP2 and DeepSpeed needs shims of accelerate/Axolotl internals; they live in
tests/harness (a `sitecustomize` put on these subprocesses' PYTHONPATH), never in the plugin.
As in tests/test_launchers.py: plain SGD, equal-length texts, and the same global batch (2
processes of micro batch 1 against one of micro batch 2), here with gradient accumulation 2 and
gradient clipping that bites. Under SGD, `update` and `gradient` masks give the same step when
nothing is clipped; with clipping they differ (clipping sees the masked gradient only in
`gradient` mode), so each mode has its own one-process reference.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file
from test_launchers import SELECTED, free_port

from cofitune_plugin.args import SoftMaskConfig
from helpers import (
    harness_env,
    recipe,
    run_axolotl,
    soft_mask_block,
    write_equal_length_dataset,
    write_recipe,
)

ZERO_CONFIG = {
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
ENGINES = {
    "fsdp2": {
        "fsdp_version": 2,
        "fsdp_config": {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    },
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
}
# ZeRO-3 as recipes/deepspeed/zero3_offload.json runs it (the 70B recipe): optimizer state and
# parameters in CPU memory, the Trainer's torch optimizer kept. Checked against one process,
# not resumed (its checkpoint path is ZeRO-3's).
OFFLOAD = {"zero_stage": 3, "offload": ("optimizer", "param")}
# Tight enough to scale every step down in both modes (unclipped norms are 0.09 to 0.85 here), so
# a rank that clipped by its own shard's norm instead of the global one would end elsewhere.
MAX_GRAD_NORM = 0.05


def engine_settings(run_dir: Path, engine: str | None, **zero_extra) -> dict:
    """`engine`'s recipe keys (none for one process); a DeepSpeed engine's config is written to
    run_dir/zero.json (`zero_extra`: more of its `zero_optimization` keys)."""
    settings = dict({**ENGINES, "zero3-offload": OFFLOAD}.get(engine, {}))
    if stage := settings.pop("zero_stage", None):
        # ZeRO-3 saves the model only if asked to gather the partitions for it
        zero = {"stage": stage, "gather_16bit_weights_on_model_save": True, **zero_extra}
        config = {**ZERO_CONFIG, "zero_optimization": zero}
        if offload := settings.pop("offload", ()):
            zero |= {f"offload_{part}": {"device": "cpu"} for part in offload}
            config |= {"zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}
        (run_dir / "zero.json").write_text(json.dumps(config))
        settings["deepspeed"] = str(run_dir / "zero.json")
    return settings


def train(
    run_dir: Path,
    model_dir: Path,
    importance: Path,
    apply_to: str,
    engine: str | None,
    **overrides,
):
    """Two SGD steps of global batch 4 (accumulation 2); one process when `engine` is None.
    `overrides`: recipe keys in place of these (steps, optimizer, checkpoints)."""
    run_dir.mkdir()
    processes = 1 if engine is None else 2
    settings = dict(
        **engine_settings(run_dir, engine),
        cofitune=soft_mask_block(importance, apply_to),
        micro_batch_size=2 // processes,
        gradient_accumulation_steps=2,
        max_steps=2,
        optimizer="sgd",
        learning_rate=10.0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        # Axolotl maps each rank's model to accelerator LOCAL_RANK; this keeps it on the CPU
        max_memory={"cpu": "64GiB"},
    )
    cfg = recipe(run_dir, model_dir, **{**settings, **overrides})
    write_equal_length_dataset(Path(cfg["datasets"][0]["path"]), model_dir)
    args = ()
    if processes > 1:
        args = (
            "--",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
        )
    result = run_axolotl(
        "train", str(write_recipe(run_dir, cfg)), *args, cwd=run_dir, env=harness_env()
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return run_dir / "out", result.stdout + result.stderr


# What the plugin logs once the engine has sharded the model: proof that it did.
ENGINE_LOG = {
    "fsdp2": "soft masks bound to this rank's FSDP2 shards",
    "zero2": "soft masks bound to this rank's DeepSpeed ZeRO-2 partitions",
    "zero3": "soft masks bound to this rank's DeepSpeed ZeRO-3 partitions",
    "zero3-offload": "soft masks bound to this rank's DeepSpeed ZeRO-3 partitions",
}
MODES = ("update", "gradient")


def session_shared(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory this session's pytest-xdist workers share: their base temp dirs' parent. Without
    xdist that parent outlives the session (it would hand an older run's results to this one), so
    then the session's own base temp dir."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_models, llama_importance) -> dict[str, dict]:
    """Final weights of a one-process run per mask mode, the reference for every engine. The
    engines' tests may run on several pytest-xdist workers: the first to get here trains the
    references into the session's shared temp dir, under a file lock, and the others read them
    (the xdist documentation's recipe for a fixture computed once)."""
    shared = session_shared(tmp_path_factory, "sharded-one-process")
    shared.mkdir(exist_ok=True)
    with FileLock(shared / "lock"):
        for mode in MODES:
            if not (shared / mode / "out" / "model.safetensors").exists():
                shutil.rmtree(shared / mode, ignore_errors=True)
                train(shared / mode, tiny_models["llama"], llama_importance, mode, None)
    return {mode: load_file(shared / mode / "out" / "model.safetensors") for mode in MODES}


@pytest.mark.axolotl
@pytest.mark.parametrize("engine", [*ENGINES, "zero3-offload"])
def test_soft_masks_on_two_cpu_processes_match_one_process(
    engine, tmp_path, tiny_models, llama_importance, one_process
):
    """For fsdp2, zero2, zero3 and zero3 with optimizer and parameters offloaded, in both mask
    modes: only the selection changes, and the weights are the one-process run's within 1e-6 of
    the step, its largest element (a lone process, an unmasked or a wrongly sliced mask, or a
    wrongly clipped step is off by a sizeable fraction of it). The steps of heavily masked heads
    are 1e-3 of that: measured against their own size, float32 weights cannot resolve 1e-6 of
    them (measured: 1-2 ulp of the weights, up to 3e-5 of the smallest tensor's step)."""
    base = load_file(tiny_models["llama"] / "model.safetensors")
    for mode in MODES:
        out, log = train(tmp_path / mode, tiny_models["llama"], llama_importance, mode, engine)
        assert ENGINE_LOG[engine] in log, log[-3000:]
        after = load_file(out / "model.safetensors")
        assert after.keys() == base.keys()
        assert {n for n in base if not torch.equal(base[n], after[n])} == SELECTED, mode
        expected = {n: one_process[mode][n] - base[n] for n in SELECTED}
        scale = max(step.abs().max().item() for step in expected.values())
        for name in sorted(SELECTED):
            assert expected[name].abs().max() > 0, name
            error = (after[name] - base[name] - expected[name]).abs().max().item()
            assert error <= 1e-6 * scale, f"{engine} {mode} {name}: {error / scale:.1e} of the step"


def test_flat_rows_pairs_every_element_of_a_partition_with_its_rows_factor():
    """A ZeRO partition is a flat slice that may start and end mid-row, and the last one is
    padded: every element in it, and only those of the parameter, get their own row's factor."""
    from cofitune_plugin.sharded import flat_rows

    shape = torch.Size([5, 4])
    factor = torch.arange(1.0, 6.0)
    for start in range(0, 20):
        for length in (1, 3, 4, 7, 13):
            values = torch.zeros(length)
            for view, rows in flat_rows(values, start, shape, factor):
                view += rows[:, None]  # a view: writes land in `values`
            covered = torch.arange(start, start + length)
            expected = torch.where(covered < 20, factor[covered.clamp(max=19) // 4], 0.0)
            assert torch.equal(values, expected), (start, length)


# ZeRO-3's limits on what a rank keeps gathered, scaled from a large model's (DeepSpeed's defaults
# keep up to 1e9 parameters live and re-used within 1e9, more than this tiny model's 95k, which
# would then stay gathered whole): each weight is released after its module's forward, and only
# the norms (32 values) stay whole on every rank, as a 70B's norms do under the default threshold.
PARTITIONING = ("zero3", "zero3-offload")
PARTITIONED = {
    "stage3_param_persistence_threshold": 100,
    "stage3_prefetch_bucket_size": 0,
    "stage3_max_live_parameters": 0,
    "stage3_max_reuse_distance": 0,
}


def importance(run_dir: Path, model_dir: Path, engine: str | None, estimator: str) -> Path:
    """`axolotl cofitune-importance` with `estimator` over 3 batches (an odd count: rank 0
    takes 2, rank 1 one) of `engine`'s recipe, on 2 CPU processes through `accelerate launch`,
    or on one process when `engine` is None. The command clears the engine's keys, except a
    ZeRO-3 recipe's `deepspeed` (run_dir/zero.json, with `PARTITIONED`): its model is then
    partitioned. Each process records the parameter bytes it held (`parameter_probe.py`) in
    run_dir/probe."""
    run_dir.mkdir()
    (run_dir / "probe").mkdir()
    settings = engine_settings(run_dir, engine, **(PARTITIONED if engine in PARTITIONING else {}))
    block = soft_mask_block(run_dir / "importance", estimator=estimator)
    # Axolotl maps each rank's model to accelerator LOCAL_RANK; this keeps it on the CPU
    cfg = recipe(run_dir, model_dir, cofitune=block, max_memory={"cpu": "64GiB"}, **settings)
    command = ("cofitune-importance", str(write_recipe(run_dir, cfg)), "--max-batches", "3")
    env = {**harness_env(), "COFITUNE_PARAMETER_PROBE": str(run_dir / "probe")}
    if engine is None:
        result = run_axolotl(*command, cwd=run_dir, env=env)
    else:
        launch = ("launch", "--multi_gpu", "--num_processes", "2", "--main_process_port")
        command = (*launch, str(free_port()), "-m", "axolotl.cli.main", *command)
        result = run_axolotl(*command, cwd=run_dir, program="accelerate", env=env)
    assert result.returncode == 0, result.stderr[-6000:]
    if engine is not None:  # the ranks joined and split the batches (else each ran all three)
        log = result.stdout + result.stderr
        for share in ("rank 0 of 2: batches [0, 2] of 3", "rank 1 of 2: batches [1] of 3"):
            assert f"cofitune: importance on {share}" in log, log[-3000:]
    return run_dir / "importance"


def parameter_bytes(importance_dir: Path) -> dict[str, dict[str, int]]:
    """What `parameter_probe.py` recorded for each rank of the run that wrote `importance_dir`."""
    probes = sorted((importance_dir.parent / "probe").glob("rank-*.json"))
    return {probe.stem: json.loads(probe.read_text()) for probe in probes}


def one_process_importance(tmp_path_factory, model_dir: Path, estimator: str) -> Path:
    """The one-process importance of the recipe with `estimator`, computed once for every
    engine's test (under a file lock, as `one_process`)."""
    shared = session_shared(tmp_path_factory, f"sharded-one-process-importance-{estimator}")
    shared.mkdir(exist_ok=True)
    with FileLock(shared / "lock"):
        if not (shared / "run" / "importance" / "manifest.json").exists():
            shutil.rmtree(shared / "run", ignore_errors=True)
            importance(shared / "run", model_dir, None, estimator)
    return shared / "run" / "importance"


DEFAULT_ESTIMATOR = SoftMaskConfig.model_fields["estimator"].default
# every engine with the default estimator, ZeRO-3 with offload too (the 70B recipe's); `fisher`
# on ZeRO-3 partitions, `das` (refused on them: tests/test_cli.py) under ZeRO-2, where every rank
# holds the whole model. Each launch costs a minute or two.
IMPORTANCE_LAUNCHES = [
    *((engine, DEFAULT_ESTIMATOR) for engine in [*ENGINES, "zero3-offload"]),
    ("zero3", "fisher"),
    ("zero2", "das"),
]


@pytest.mark.axolotl
@pytest.mark.parametrize(("engine", "estimator"), IMPORTANCE_LAUNCHES)
def test_importance_under_each_launcher_is_the_one_process_artifact(
    engine, estimator, tmp_path, tmp_path_factory, tiny_models
):
    """fsdp2, zero2, zero3 and zero3-offload recipes, `cofitune-importance` on 2 CPU processes:
    the one-process manifest (weight and data fingerprints, estimator, batches, tokens) and its
    tensors within float32 rounding of sums taken in another order (rtol 1e-5, atol 1e-6 of the
    largest element: a rank that drew other noise, took other batches or counted its own tokens
    only is off by the values' own size). Under ZeRO-3 the model stays partitioned: no rank
    holds more than 3/4 of the whole model's parameter bytes at any sampled moment (its half,
    the norms, and the weights of the module running), where the one process and the other
    engines' ranks hold it all."""
    written = importance(tmp_path / engine, tiny_models["llama"], engine, estimator)
    reference_dir = one_process_importance(tmp_path_factory, tiny_models["llama"], estimator)
    reference = json.loads((reference_dir / "manifest.json").read_text())
    # every field but the model's path: each pytest-xdist worker builds its own copy of the
    # tiny model, and the reference may come from another worker's (the fingerprint is the same)
    manifest = json.loads((written / "manifest.json").read_text())
    del manifest["base_model"], reference["base_model"]
    assert manifest == reference
    assert (reference["batches"], reference["estimator"]) == (3, estimator)
    expected = load_file(reference_dir / "importance.safetensors")
    for name, tensor in load_file(written / "importance.safetensors").items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6 * scale)

    held = parameter_bytes(written)
    (one,) = parameter_bytes(reference_dir).values()
    assert sorted(held) == ["rank-0", "rank-1"], held
    print(f"parameter bytes held at the peak: one process {one}, {engine} {held}")
    assert one["peak"] == one["whole"]
    for rank in held.values():
        assert rank["whole"] == one["whole"]
        if engine in PARTITIONING:
            assert rank["peak"] <= 0.75 * rank["whole"], rank
        else:
            assert rank["peak"] == rank["whole"], rank


# AdamW with weight decay: the optimizer state (moments, step count) must come back from the
# checkpoint for the resumed run to end where the straight one does.
RESUME = {
    "max_steps": 4,
    "optimizer": "adamw_torch",
    "learning_rate": 1e-2,
    "weight_decay": 0.1,
    "save_only_model": False,
}
BOUND = re.compile(r"soft masks bound to this rank's .*?rank (\d+), mask fingerprint (\w+)")


@pytest.mark.axolotl
@pytest.mark.parametrize("engine", list(ENGINES))
def test_resume_under_each_launcher_ends_where_the_straight_run_does(
    engine, tmp_path, tiny_models, llama_importance
):
    """fsdp2, zero2, zero3 on 2 CPU processes, `update` masks, AdamW: 4 steps checkpointing at
    step 2, then a second run resumed from that checkpoint, which trains steps 3 and 4 only.
    Both end bitwise at the same weights (same ranks, same reduction order, and the fp32
    weights, optimizer moments and step count restored exactly: nothing is left to round
    differently), the frozen weights never move, and each rank binds the same mask rows by the
    same factors after the resume as before (the fingerprint every rank logs)."""
    runs = {}
    for run, overrides in (
        ("straight", {"save_strategy": "steps", "save_steps": 2}),
        ("resumed", {"resume_from_checkpoint": str(tmp_path / "straight/out/checkpoint-2")}),
    ):
        out, log = train(
            tmp_path / run,
            tiny_models["llama"],
            llama_importance,
            "update",
            engine,
            **RESUME,
            **overrides,
        )
        assert ENGINE_LOG[engine] in log, log[-3000:]
        runs[run] = load_file(out / "model.safetensors"), log

    (straight, straight_log), (resumed, resumed_log) = runs["straight"], runs["resumed"]
    assert straight_log.count("{'loss': ") == 4 and resumed_log.count("{'loss': ") == 2
    bound = dict(BOUND.findall(straight_log))
    assert sorted(bound) == ["0", "1"], straight_log[-3000:]
    assert dict(BOUND.findall(resumed_log)) == bound
    base = load_file(tiny_models["llama"] / "model.safetensors")
    assert {n for n in base if not torch.equal(base[n], straight[n])} == SELECTED
    for name in base:
        assert torch.equal(resumed[name], straight[name]), name
