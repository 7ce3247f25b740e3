"""The memory model's arithmetic on a tiny Llama, against a hand computation, and the
`axolotl cofitune-plan` command on a real recipe, offline."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cofitune_plugin.memory_plan import (
    GIB,
    Setup,
    full_fine_tuning,
    model_shape,
    plan_memory,
    recipe_setup,
)
from cofitune_plugin.selection import select
from helpers import run_axolotl, tiny_config

# hidden 8, FFN 16, 4 layers, 2 query heads of 4 and 1 key/value head (kv width 4), vocab 10
SIZES = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 4, "vocab_size": 10}
CONFIG = tiny_config("llama", num_attention_heads=2, num_key_value_heads=1, **SIZES)
# a layer: q 64 + k 32 + v 32 + o 64 + gate/up/down 3 x 128 + 2 norms x 8 = 592
# the model: 4 x 592 + embeddings 80 + head 80 + final norm 8 = 2536
# `ffn` in 25%-50% of 4 layers is layer 1: up + down = 256
PARAMETERS, LAYER, TRAINED = 2536, 592, 256


@pytest.fixture(scope="module")
def shape():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG)
    selection = select(model, "25%-50%", "ffn")
    return model, selection, model_shape(model, selection)


def test_the_shape_counts_the_model_and_its_selection(shape):
    model, selection, counted = shape
    assert (counted.parameters, counted.trainable, counted.layer_parameters) == (
        PARAMETERS,
        TRAINED,
        LAYER,
    )
    assert (counted.first_trained_layer, counted.trained_layers, counted.kv_dim) == (1, 1, 4)
    lora = model_shape(model, selection, lora_rank=2)  # r x (in + out): 2 x 24 per module
    assert (lora.trainable, lora.parameters) == (96, PARAMETERS + 96)


def setup(launcher: str, **changes) -> Setup:
    """2 devices, bf16, a micro batch of 2 x 3 tokens, no checkpointing, no mask."""
    base = Setup(
        launcher, devices=2, weight_bytes=2, micro_batch=2, sequence_len=3, checkpointing=False
    )
    return replace(base, **changes)


def test_ddp_with_an_update_mask_by_hand(shape):
    roles = plan_memory(shape[2], setup("ddp", update_mask=True)).roles
    # 6 tokens; layer 1 trains: 6h + 2kv + 4i = 120; layers 2-3 are frozen in the backward:
    # 4h + 2kv + 3i = 88 each; layer 0 keeps nothing. In bf16: 6 x (120 + 176) x 2 bytes.
    assert roles == {
        "weights": PARAMETERS * 2,
        "gradients": TRAINED * 2,
        "Adam moments": TRAINED * 4,
        "update mask copy": TRAINED * 2,
        "activations": 6 * 296 * 2,
        "logits": 6 * 10 * (2 + 4 + 8),
        "CUDA context (assumed)": GIB,
    }


def test_full_fine_tuning_of_the_same_setup_trains_every_weight(shape):
    model, selection, _ = shape
    lora = model_shape(model, selection, lora_rank=2, quantized=True)
    full, full_setup = full_fine_tuning(lora, setup("ddp", trainable_bytes=4, update_mask=True))
    assert (full.parameters, full.trainable, full.quantized) == (PARAMETERS, PARAMETERS, 0)
    assert (full.first_trained_layer, full.trained_layers) == (0, 4)
    assert (full_setup.trainable_bytes, full_setup.update_mask) == (None, False)


def test_zero3_shards_weights_and_keeps_fp32_state_by_hand(shape):
    roles = plan_memory(shape[2], setup("zero3", checkpointing=True)).roles
    assert roles["weights"] == PARAMETERS * 2 / 2 + 2 * LAYER * 2  # a shard + 2 gathered layers
    assert roles["gradients"] == TRAINED * 2 / 2
    assert roles["fp32 master"] == 4 * TRAINED / 2
    assert roles["Adam moments"] == 8 * TRAINED / 2
    # checkpointing: layers 1-3 keep their input (h = 8), one layer is recomputed (120)
    assert roles["activations"] == 6 * (3 * 8 + 120) * 2


def test_zero3_offload_moves_weights_and_optimizer_state_to_the_cpu(shape):
    plan = plan_memory(shape[2], setup("zero3_offload"))
    assert plan.roles["weights"] == 2 * LAYER * 2
    assert "Adam moments" not in plan.roles
    assert plan.offloaded == PARAMETERS * 2 + 16 * TRAINED


@pytest.mark.parametrize(
    ("launcher", "on_device", "on_cpu"),
    [
        ("ddp", TRAINED * 2, 0),  # the selection, in its dtype
        ("fsdp2", TRAINED * 2 / 2, 0),  # this rank's shard of it
        ("zero2", 4 * TRAINED / 2, 0),  # DeepSpeed's fp32 partition: what its optimizer steps
        ("zero3", 4 * TRAINED / 2, 0),
        ("zero3_offload", None, 4 * TRAINED),  # every rank's fp32 partition, in CPU memory
    ],
)
def test_the_update_mask_copies_what_the_optimizer_steps(shape, launcher, on_device, on_cpu):
    plain = plan_memory(shape[2], setup(launcher))
    masked = plan_memory(shape[2], setup(launcher, update_mask=True))
    assert masked.roles.get("update mask copy") == on_device
    assert masked.offloaded - plain.offloaded == on_cpu


def test_recipe_setup_reads_the_launcher_from_the_recipe(shape):
    zero3 = recipe_setup({"deepspeed": "recipes/deepspeed/zero3_offload.json", "bf16": True}, 8)
    assert (zero3.launcher, zero3.weight_bytes) == ("zero3_offload", 2)
    fsdp = recipe_setup({"fsdp_version": 2, "fsdp_config": {"activation_checkpointing": True}}, 4)
    assert (fsdp.launcher, fsdp.checkpointing, fsdp.weight_bytes) == ("fsdp2", True, 4)
    roles = plan_memory(shape[2], setup("fsdp2")).roles  # sharded in the loaded dtype
    assert (roles["weights"], roles["Adam moments"]) == (PARAMETERS + 2 * LAYER * 2, TRAINED * 2)
    masked = recipe_setup({"cofitune": {"soft_mask": {"importance": "x"}}}, 1)
    assert (masked.launcher, masked.update_mask) == ("single", True)


@pytest.mark.axolotl
def test_axolotl_cofitune_plan_prints_the_plan_of_a_recipe(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    result = run_axolotl(
        "cofitune-plan",
        "recipes/cofitune-13b.yml",
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--model-config",
        "tests/model_configs/Llama-2-13b-chat-hf.json",
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "zero3 on 8 GPU(s)" in result.stdout
    assert re.search(r"fits 80 GiB +yes", result.stdout), result.stdout
