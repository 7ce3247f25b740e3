"""The fine-tuning methods the forgetting benchmark compares, each as its users run it.

A method decides what trains: a set of parameters (full fine-tuning, layer freezing, Spectrum,
HFT, CoFiTune's selections) or LoRA adapters, and with it what the loss sees (Axolotl's EAFT
loss, `use_eaft`; general text mixed into the domain's data, replay) or how a step moves the
weights (MoFO, `mofo.py`). CoFiTune's methods go
through the plugin (its selection, its report and its soft masks); the selections the other
methods make are written here in a few lines of PyTorch because none of them is an Axolotl
option. The rates each method runs at are the plan's (`__main__.py`), not the method's.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kl import BETA as KL_BETA
from torch import nn

from cofitune_plugin.selection import find_decoder_layers

# Linear module types inside a decoder layer, as Spectrum names them ("mlp.down_proj").
LINEAR_TYPES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# Rows evaluated between the base and a trained run, base + a (tuned - base), by name: the method
# whose run they interpolate, and what they are. Full fine-tuning's is WiSE-FT;
# CoFiTune's default's is the plugin's dial (`axolotl cofitune-dial`) on the selection, and so is
# the unmasked control's (the default for a day, 2026-12-05, so its records carry it).
INTERPOLATIONS = {
    "wise-ft": ("full", "WiSE-FT: base + a (full - base)"),
    "cofitune-dial": ("cofitune-default", "the dial: base + a (CoFiTune's default - base)"),
    "cofitune-dial-unmasked": (
        "cofitune-default-unmasked",
        "the dial on the unmasked control: base + a (unmasked control - base)",
    ),
}
ALPHAS = [0.25, 0.5, 0.75]
CURVE_OF = {method: name for name, (method, _) in INTERPOLATIONS.items()}  # method -> its curve


@dataclass(frozen=True)
class Method:
    """One method of the benchmark's table (one row per learning rate).

    `kind`: "base" (no training), "full", "lora", "params" (the names `trainable` returns) or
    "cofitune" (the plugin's selection `layers` x `modules`, with `soft_mask` None, "update" or
    "gradient"). `layers == "search"` takes the selection `axolotl cofitune-search` chose.
    `config`: Axolotl keys the run sets (EAFT's loss). `replay`: the share of the training rows
    that are general text. `mofo`: trained with MoFO (`mofo.py`) instead of AdamW. `kl`: the
    weight of a KL term to the base in the loss (`kl.py`), 0 for none. `dft`: trained with the
    DFT loss (`dft.py`). `permuted_mask`: the soft mask from the importance's permuted copy
    (`permuted.py`), the fine level's control.
    `default_recipe`: CoFiTune as the README tells a user to run it.
    """

    name: str
    kind: str
    description: str = ""
    layers: str | None = None
    modules: str | None = None
    soft_mask: str | None = None
    lora: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    replay: float = 0.0
    mofo: bool = False
    kl: float = 0.0
    dft: bool = False
    permuted_mask: bool = False
    default_recipe: bool = False

    def importance(self, work: Path) -> Path:
        """The importance this method's mask is made from, in the benchmark's work dir."""
        return work / ("importance-permuted" if self.permuted_mask else "importance")


# The share of general text in the training rows of each replay method.
REPLAY_SHARES = (0.01, 0.05, 0.2)


def all_methods() -> list[Method]:
    """Every method of the benchmark; the plan says at which rates each runs."""
    cofitune = {"kind": "cofitune", "layers": "25%-50%", "modules": "ffn"}
    # Base first (every run's reference), full fine-tuning next (the Spec reference), then the
    # rows the question is about, then the other methods by how often users pick them: a run
    # stopped by time still answers the question.
    return [
        Method("base", "base", description="the aligned model, not trained"),
        Method("full", "full", "full fine-tuning"),
        Method(
            "cofitune-default",
            "cofitune",
            "CoFiTune as README runs it: the selection `axolotl cofitune-search` chose, "
            "with the default soft mask (update)",
            layers="search",
            soft_mask="update",
            default_recipe=True,
        ),
        # the fine level's questions, on the default's own selection: what the update mask adds
        # (the default without it for a day, 2026-12-05, until the math test brought it back),
        # and whether the importance behind it does more than a mask of the same strength at random
        Method(
            "cofitune-default-unmasked",
            "cofitune",
            "the search's selection without a soft mask",
            layers="search",
        ),
        Method(
            "cofitune-default-permuted",
            "cofitune",
            "the search's selection with the update mask of the importance permuted within "
            "each layer and unit type (same strength, no information)",
            layers="search",
            soft_mask="update",
            permuted_mask=True,
        ),
        Method("cofitune", description="CoFiTune coarse: ffn in 25%-50%, no mask", **cofitune),
        Method(
            "cofitune+mask-update",
            description="CoFiTune coarse + soft mask (update)",
            soft_mask="update",
            **cofitune,
        ),
        Method(
            "lora",
            "lora",
            "LoRA r=16, alpha=32, on all linear layers (PEFT `all-linear`)",
            lora={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        ),
        Method(
            "eaft",
            "full",
            "full fine-tuning with Axolotl's EAFT loss (`use_eaft`: tokens weighted by the "
            "model's entropy)",
            config={"use_eaft": True},
        ),
        Method(
            "dft",
            "full",
            "full fine-tuning with the DFT loss (each token's cross-entropy weighted by its "
            "detached probability: Axolotl's `use_dft` from 0.20 on)",
            dft=True,
        ),
        *(
            Method(
                f"replay-{share:.0%}",
                "full",
                f"full fine-tuning with {share:.0%} of the training rows general text "
                "(Wikipedia passages, Axolotl `completion` rows)",
                replay=share,
            )
            for share in REPLAY_SHARES
        ),
        Method(
            "sft-kl",
            "full",
            f"full fine-tuning with {KL_BETA:g} x KL(base || model) per trained token added to "
            "the loss",
            kl=KL_BETA,
        ),
        Method(
            "mofo",
            "full",
            "MoFO: every weight trainable, each step moving the 10% of each tensor's entries "
            "with the largest Adam momentum",
            mofo=True,
        ),
        Method("hft", "params", "HFT: a random half of each layer's matrices"),
        Method("spectrum", "params", "Spectrum: top 25% weight SNR per module type"),
        Method("freeze", "params", "LLaMA-Factory freeze: the last 25% of layers"),
        Method(
            "cofitune+mask-gradient",
            description="CoFiTune coarse + soft mask (gradient, the paper's)",
            soft_mask="gradient",
            **cofitune,
        ),
    ]


def trainable_names(method: Method, model: nn.Module, seed: int) -> list[str]:
    """The parameters a "params" method trains on `model`."""
    layers = _decoder_layers(model)
    if method.name == "freeze":
        return last_layers(layers, share=0.25)
    if method.name == "spectrum":
        return spectrum_selection(model, layers, top_share=0.25)
    if method.name == "hft":
        return half_of_each_layer(layers, seed)
    raise ValueError(f"{method.name}: not a parameter-selection method")


def last_layers(layers: dict[int, tuple[str, nn.Module]], share: float) -> list[str]:
    """LLaMA-Factory's `finetuning_type: freeze`: every parameter of the last layers
    (`freeze_trainable_layers` = share x depth, `freeze_trainable_modules: all`)."""
    count = max(1, round(len(layers) * share))
    return [
        f"{prefix}.{name}"
        for index, (prefix, layer) in layers.items()
        if index >= len(layers) - count
        for name, _ in layer.named_parameters()
    ]


def spectrum_selection(
    model: nn.Module, layers: dict[int, tuple[str, nn.Module]], top_share: float
) -> list[str]:
    """Spectrum's choice: per linear module type, the layers whose weight has the highest
    signal-to-noise ratio (singular values above the Marchenko-Pastur edge of a noise level
    estimated from their interquartile range, over those below, divided by the largest), the top
    `top_share` of them (rounded down); plus the embeddings and the LM head, which Spectrum's
    generated `unfrozen_parameters` always include."""
    chosen = []
    for module_type in LINEAR_TYPES:
        ranked = sorted(
            (
                (weight_snr(layer.get_submodule(module_type).weight), f"{prefix}.{module_type}")
                for prefix, layer in layers.values()
            ),
            reverse=True,
        )
        chosen += [f"{name}.weight" for _, name in ranked[: int(len(ranked) * top_share)]]
    always = ("lm_head.weight", "model.embed_tokens.weight")
    named = dict(model.named_parameters())  # tied weights appear once, under the first name
    return chosen + [name for name in always if name in named]


@torch.no_grad()
def weight_snr(weight: torch.Tensor) -> float:
    values = torch.linalg.svdvals(weight.detach().float())
    q25, q75 = torch.quantile(values, torch.tensor([0.25, 0.75]))
    sigma = (q75 - q25) / 1.349  # the IQR of a normal distribution is 1.349 sigma
    rows, cols = weight.shape
    beta = min(rows, cols) / max(rows, cols)
    edge = sigma * (1 + beta**0.5)
    signal, noise = values[values > edge].sum(), values[values <= edge].sum()
    return float(signal / noise / values[0]) if noise > 0 else float("inf")


def half_of_each_layer(layers: dict[int, tuple[str, nn.Module]], seed: int) -> list[str]:
    """HFT (Hui et al., 2024): in every layer, train a random half of the attention matrices
    (2 of 4) and of the FFN matrices (alternately 1 and 2 of 3), freeze the rest; norms and
    embeddings stay frozen. A new half per seed."""
    rng = random.Random(seed)
    attention = [t for t in LINEAR_TYPES if t.startswith("self_attn")]
    ffn = [t for t in LINEAR_TYPES if t.startswith("mlp")]
    chosen = []
    for index, (prefix, _) in layers.items():
        picked = rng.sample(attention, 2) + rng.sample(ffn, 1 + index % 2)
        chosen += [f"{prefix}.{module_type}.weight" for module_type in picked]
    return chosen


def _decoder_layers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    prefix = find_decoder_layers(model, model.config.num_hidden_layers)
    stack = model.get_submodule(prefix)
    return {i: (f"{prefix}.{i}", layer) for i, layer in enumerate(stack)}
