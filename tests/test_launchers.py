"""`axolotl train` launched as 2 DDP processes on CPU (gloo) trains what one process trains.

Two processes of micro batch 1 and one process of micro batch 2 see the same global batches. With
plain SGD (a step linear in the gradient) and texts of equal token length (Axolotl averages the
loss per process), DDP's averaged gradient is the single process's, so the final weights agree to
float rounding, soft masks included. In `update` mode under SGD the masked step is the same as in
`gradient` mode, so both DDP runs are checked against one single-process `gradient` run.
"""

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    harness_env,
    recipe,
    run_axolotl,
    soft_mask_block,
    write_equal_length_dataset,
    write_recipe,
)

SELECTED = {
    f"model.layers.{layer}.{module}.weight"
    for layer in (2, 3)
    for module in (
        "mlp.up_proj",
        "mlp.down_proj",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    )
}


def free_port() -> int:
    """A port for the processes' rendezvous, so a run never meets another one's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, model_dir: Path, importance: Path, apply_to: str, processes: int) -> Path:
    """Two SGD steps over a global batch of 2, split over `processes`; returns the output dir."""
    run_dir.mkdir()
    cfg = recipe(
        run_dir,
        model_dir,
        cofitune=soft_mask_block(importance, apply_to),
        micro_batch_size=2 // processes,
        max_steps=2,
        optimizer="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    write_equal_length_dataset(Path(cfg["datasets"][0]["path"]), model_dir)
    launcher = ("--", "--multi_gpu", "--num_processes", str(processes))
    port = ("--main_process_port", str(free_port()))
    args = launcher + port if processes > 1 else ()
    result = run_axolotl(
        "train", str(write_recipe(run_dir, cfg)), *args, cwd=run_dir, env=harness_env(engines=False)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    if processes > 1:
        assert "train as one DDP job over gloo" in result.stdout + result.stderr
    return run_dir / "out"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, llama_importance) -> dict[str, Path]:
    """Output dirs of one single-process run and of 2-process DDP runs in both mask modes."""
    root = tmp_path_factory.mktemp("launchers")
    model = tiny_models["llama"]
    runs = {"single": ("gradient", 1), "ddp-gradient": ("gradient", 2), "ddp-update": ("update", 2)}
    return {
        name: train(root / name, model, llama_importance, apply_to, processes)
        for name, (apply_to, processes) in runs.items()
    }


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "model.safetensors")


@pytest.mark.axolotl
@pytest.mark.parametrize("run", ["ddp-gradient", "ddp-update"])
def test_ddp_on_two_cpu_processes_changes_exactly_the_selection(trained, tiny_models, run):
    base = weights(tiny_models["llama"])
    after = weights(trained[run])
    assert after.keys() == base.keys()
    assert {name for name in base if not torch.equal(base[name], after[name])} == SELECTED


@pytest.mark.axolotl
@pytest.mark.parametrize("run", ["ddp-gradient", "ddp-update"])
def test_ddp_with_soft_masks_matches_one_process_over_the_same_global_batch(
    trained, tiny_models, run
):
    """A lone process (no all-reduce) or an unmasked step would differ by a sizeable fraction
    of the step; float rounding of the reduction stays far below 1e-3 of it."""
    base = weights(tiny_models["llama"])
    single, ddp = weights(trained["single"]), weights(trained[run])
    for name in sorted(SELECTED):
        expected = single[name] - base[name]
        scale = expected.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(ddp[name] - base[name], expected, rtol=0, atol=1e-3 * scale)
