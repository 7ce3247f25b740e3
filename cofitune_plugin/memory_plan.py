"""How much memory a CoFiTune run needs per device, by role, before anyone rents a GPU.

CoFiTune's saving is that only the selection (about 10% of the parameters) carries gradients and
optimizer state; the frozen weights still sit in memory. So the plan counts bytes per parameter by
role (weights, gradients, an fp32 master copy, Adam's two moments, the update mask's copy of the
selection) for the launcher's sharding, plus the activations of one micro batch. Plain arithmetic
over a model's shapes: no Axolotl, no weights, and checked in `tests/test_memory_plan.py` against
a hand computation and, in `benchmarks/memory.py`, against measured peak memory on a CPU.

The rules, per device, with N devices, P parameters, T trained (the adapters' with LoRA), w the
bytes of a weight (2 in bf16/fp16, 4 in float32; 4-bit weights take 0.5 plus their scales):
- `single`/`ddp` (Axolotl trains bf16 weights in place; torch's AdamW keeps its moments in the
  parameter's dtype): weights P w, gradients T w, moments 2 T w, update-mask copy T w.
- DeepSpeed ZeRO-2: weights P w whole; gradients T w / N; fp32 master 4 T / N; fp32 moments
  8 T / N (DeepSpeed keeps both in float32 and shards them); the update mask copies what the
  optimizer steps, the fp32 partition: 4 T / N (on the CPU under offload).
- ZeRO-3: as ZeRO-2 with the weights sharded too (P w / N), plus the decoder layers gathered at
  a time (the one computing and the one prefetched: 2 layers in w).
- ZeRO-3 with CPU offload: on the device only the gathered layers, the gradient partition and
  the activations; the weights (P w), the fp32 master, moments and gradients (16 T) live in the
  node's CPU memory (reported separately, for all N devices of one node).
- FSDP2: weights P w / N, gradients T w / N, moments 2 T w / N, update-mask copy T w / N, plus
  2 gathered layers in w.
  The parameters stay in the dtype Axolotl loaded: accelerate 1.13's "upcast of low precision
  parameters to fp32" (`fsdp2_prepare_model`) rebinds a loop variable only and changes nothing.

Activations per token, in w bytes (Llama-style decoder, SDPA attention, SiLU-gated FFN, hidden h,
FFN width i, key/value width kv): backward runs only from the first trained layer on, so layers
below it keep nothing. A layer that trains keeps 6h + 2kv + 4i (norm inputs, the inputs of its
linear layers, SDPA's q/k/v/output, the FFN's gate, up and product); a frozen layer inside the
backward keeps 4h + 2kv + 3i (a frozen linear layer needs no copy of its input). With gradient
checkpointing each of those layers keeps only its input (h), and one layer is recomputed at a
time. The logits add V per token in w, and a float32 copy, log-softmax and its gradient (12 bytes).
On a GPU a fixed 1 GiB stands for the CUDA context and allocator slack (an assumption, not a
measurement).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from torch import nn

from cofitune_plugin.selection import Selection

GIB = 2**30
CUDA_RESERVE = 1 * GIB
QUANTIZED_BYTES = 0.5 + 4 / 64  # NF4: 4 bits per weight plus an fp32 scale per block of 64

Launcher = Literal["single", "ddp", "zero2", "zero3", "zero3_offload", "fsdp2"]
LAUNCHERS: tuple[str, ...] = Launcher.__args__
SHARDED_WEIGHTS = ("zero3", "fsdp2")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a model and its selection."""

    parameters: int  # all parameters of the model, adapters included
    trainable: int  # parameters that train (with LoRA: the adapters)
    layers: int
    trained_layers: int  # decoder layers holding a trainable parameter
    first_trained_layer: int  # backward stops below it
    hidden: int
    intermediate: int
    kv_dim: int  # width of the key (= value) projection
    vocab: int
    layer_parameters: int  # parameters of one decoder layer
    quantized: int = 0  # parameters stored in 4 bits (QLoRA)


@dataclass(frozen=True)
class Setup:
    """How a recipe trains: launcher, device count, dtypes, micro batch."""

    launcher: Launcher
    devices: int
    weight_bytes: int  # 2 for bf16/fp16, 4 for float32
    micro_batch: int
    sequence_len: int
    checkpointing: bool
    update_mask: bool = False
    trainable_bytes: int | None = None  # LoRA adapters: PEFT keeps them in float32
    on_gpu: bool = True


@dataclass(frozen=True)
class Plan:
    """Bytes per device by role, and what a ZeRO offload keeps in the node's CPU memory."""

    roles: dict[str, float]
    offloaded: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.roles.values())


def plan_memory(shape: ModelShape, setup: Setup) -> Plan:
    """Bytes per device of one training step at its peak, by role (see the module docstring)."""
    if setup.launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, not {setup.launcher!r}")
    n = setup.devices
    w = setup.weight_bytes
    t = setup.trainable_bytes or w
    trained = shape.trainable
    frozen = shape.parameters - trained - shape.quantized
    weights = frozen * w + shape.quantized * QUANTIZED_BYTES + trained * t
    gathered = 2 * shape.layer_parameters * w
    deepspeed = setup.launcher.startswith("zero")
    roles: dict[str, float] = {}
    offloaded = 0.0
    if setup.launcher in ("single", "ddp"):
        roles["weights"] = weights
        roles["gradients"] = trained * t
        roles["Adam moments"] = 2 * trained * t
    elif setup.launcher == "fsdp2":
        roles["weights"] = weights / n + gathered
        roles["gradients"] = trained * t / n
        roles["Adam moments"] = 2 * trained * t / n
    elif setup.launcher == "zero3_offload":
        roles["weights"] = gathered
        roles["gradients"] = trained * t / n
        offloaded = weights + 16 * trained  # fp32 master, moments and gradients of every rank
    else:
        roles["weights"] = weights / n + gathered if setup.launcher == "zero3" else weights
        roles["gradients"] = trained * t / n
    if deepspeed and setup.launcher != "zero3_offload":
        roles["fp32 master"] = 4 * trained / n
        roles["Adam moments"] = 8 * trained / n
    if setup.update_mask:
        # a copy of what the optimizer steps on this device (`softmask.SoftMask`'s placements):
        # the selection itself, FSDP2's shard of it, DeepSpeed's fp32 partition of it (which
        # offload keeps in CPU memory, with the optimizer)
        if setup.launcher == "zero3_offload":
            offloaded += 4 * trained
        elif deepspeed:
            roles["update mask copy"] = 4 * trained / n
        else:
            roles["update mask copy"] = trained * t / (n if setup.launcher == "fsdp2" else 1)
    roles["activations"] = activation_bytes(shape, setup)
    roles["logits"] = logit_bytes(shape, setup)
    if setup.on_gpu:
        roles["CUDA context (assumed)"] = CUDA_RESERVE
    return Plan(roles=roles, offloaded=offloaded)


def activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """What the decoder layers keep for backward, for one micro batch."""
    tokens = setup.micro_batch * setup.sequence_len
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    trained_layer = 6 * h + 2 * kv + 4 * i
    frozen_layer = 4 * h + 2 * kv + 3 * i
    in_backward = shape.layers - shape.first_trained_layer
    if setup.checkpointing:
        per_token = in_backward * h + trained_layer
    else:
        per_token = (
            shape.trained_layers * trained_layer
            + (in_backward - shape.trained_layers) * frozen_layer
        )
    return tokens * per_token * setup.weight_bytes


def logit_bytes(shape: ModelShape, setup: Setup) -> float:
    """The logits, their float32 copy (none in float32), log-softmax and its gradient."""
    per_logit = setup.weight_bytes + (4 if setup.weight_bytes < 4 else 0) + 8
    return setup.micro_batch * setup.sequence_len * shape.vocab * per_logit


def format_plan(plan: Plan, device_memory_gib: float | None = None) -> str:
    """The roles as a small table in GiB, with the verdict against a device's memory."""
    rows = [f"  {role:<24} {size / GIB:>9.2f} GiB" for role, size in plan.roles.items()]
    rows.append(f"  {'total per device':<24} {plan.total / GIB:>9.2f} GiB")
    if plan.offloaded:
        rows.append(f"  {'CPU memory (offload)':<24} {plan.offloaded / GIB:>9.2f} GiB per node")
    if device_memory_gib is not None:
        fits = plan.total / GIB <= device_memory_gib
        rows.append(
            f"  {'fits ' + f'{device_memory_gib:g} GiB':<24} {'yes' if fits else 'NO':>9}"
            + ("" if fits else f" (short by {plan.total / GIB - device_memory_gib:.1f} GiB)")
        )
    return "\n".join(rows)


def model_shape(
    model: nn.Module, selection: Selection, lora_rank: int | None = None, quantized: bool = False
) -> ModelShape:
    """The shape of `model` (real or on the meta device) training `selection`: its weights, or
    with `lora_rank` LoRA adapters on its modules (r x (in + out) each); `quantized` stores every
    linear weight of the decoder layers in 4 bits, as QLoRA does."""
    config = model.config.get_text_config()
    parameters = sum(p.numel() for p in model.parameters())
    if lora_rank is None:
        trainable = selection.numel
    else:
        shapes = [model.get_parameter(name).shape for name in selection.parameters]
        trainable = sum(lora_rank * (rows + cols) for rows, cols in shapes if cols)
        parameters += trainable
    layer = model.get_submodule(f"{selection.layer_prefix}.0")
    in_layers = [m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        parameters=parameters,
        trainable=trainable,
        layers=config.num_hidden_layers,
        trained_layers=len(selection.layers),
        first_trained_layer=min(selection.layers),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        vocab=config.vocab_size,
        layer_parameters=sum(p.numel() for p in layer.parameters()),
        quantized=sum(in_layers) * config.num_hidden_layers if quantized else 0,
    )


def zero_optimization(recipe: Mapping[str, Any], root: Path = Path(".")) -> Mapping[str, Any]:
    """The `zero_optimization` block of a recipe's `deepspeed` config (inline, or a JSON file
    relative to `root`); empty without one."""
    deepspeed = recipe.get("deepspeed") or {}
    if not isinstance(deepspeed, Mapping):
        deepspeed = json.loads((root / deepspeed).read_text())
    return deepspeed.get("zero_optimization", {})


def recipe_setup(recipe: Mapping[str, Any], devices: int, root: Path = Path(".")) -> Setup:
    """The launcher and dtypes an Axolotl recipe trains with on `devices` GPUs (DeepSpeed
    config paths relative to `root`)."""
    launcher: Launcher = "ddp" if devices > 1 else "single"
    if recipe.get("deepspeed"):
        zero = zero_optimization(recipe, root)
        offload = (zero.get("offload_param") or {}).get("device") == "cpu"
        launcher = "zero3_offload" if offload else f"zero{zero.get('stage', 0)}"
        if launcher not in LAUNCHERS:
            raise ValueError(f"deepspeed: ZeRO stage {zero.get('stage')} is not modelled")
    elif recipe.get("fsdp_version") == 2:
        launcher = "fsdp2"
    half = any(recipe.get(key) not in (None, False) for key in ("bf16", "fp16"))
    soft_mask = (recipe.get("cofitune") or {}).get("soft_mask") or {}
    fsdp_checkpointing = (recipe.get("fsdp_config") or {}).get("activation_checkpointing")
    return Setup(
        launcher=launcher,
        devices=devices,
        weight_bytes=2 if half else 4,
        micro_batch=recipe.get("micro_batch_size") or 1,
        sequence_len=recipe.get("sequence_len") or 2048,
        checkpointing=bool(recipe.get("gradient_checkpointing") or fsdp_checkpointing),
        update_mask=bool(soft_mask) and soft_mask.get("apply_to", "update") == "update",
        trainable_bytes=4 if str(recipe.get("adapter", "")).endswith("lora") else None,
    )


def describe_plan(
    recipe: Mapping[str, Any],
    model: nn.Module,
    selection: Selection,
    devices: int,
    device_memory_gib: float | None = None,
    root: Path = Path("."),
) -> str:
    """What `axolotl cofitune-plan` prints: the run, then its memory by role."""
    adapter = str(recipe.get("adapter", ""))
    lora_rank = recipe.get("lora_r") if adapter.endswith("lora") else None
    shape = model_shape(model, selection, lora_rank, quantized=adapter == "cofitune-qlora")
    setup = recipe_setup(recipe, devices, root)
    plan = plan_memory(shape, setup)
    full = plan_memory(*full_fine_tuning(shape, setup))
    head = (
        f"{recipe.get('base_model')}: {shape.parameters / 1e9:.2f}B parameters, "
        f"{shape.trainable / 1e9:.3f}B trainable ({100 * shape.trainable / shape.parameters:.1f}%)"
        f"; {setup.launcher} on {devices} GPU(s), {setup.weight_bytes}-byte weights, micro batch "
        f"{setup.micro_batch} x {setup.sequence_len} tokens, gradient checkpointing "
        f"{'on' if setup.checkpointing else 'off'}"
    )
    return (
        f"{head}\nPer GPU (estimate, see cofitune_plugin/memory_plan.py):\n"
        f"{format_plan(plan, device_memory_gib)}\n"
        f"Full fine-tuning in the same setup: {full.total / GIB:.2f} GiB per GPU"
        + (f", {full.offloaded / GIB:.2f} GiB of CPU memory per node" if full.offloaded else "")
    )


def full_fine_tuning(shape: ModelShape, setup: Setup) -> tuple[ModelShape, Setup]:
    """The same model and launcher training every weight (no adapters, no 4-bit, no mask)."""
    lora = shape.trainable if setup.trainable_bytes else 0
    base = shape.parameters - lora
    every_layer = {"first_trained_layer": 0, "trained_layers": shape.layers}
    return (
        replace(shape, parameters=base, trainable=base, quantized=0, **every_layer),
        replace(setup, update_mask=False, trainable_bytes=None),
    )
