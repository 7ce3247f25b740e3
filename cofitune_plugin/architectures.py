"""Where each decoder architecture keeps the modules CoFiTune trains.

CoFiTune's module sets are defined on Llama: `ffn` is the up and down projections (the gate
projection stays frozen) and `mha` is the query, key and value projections (the output projection
stays frozen). Other architectures name these differently or fuse them, so each supported
`model_type` maps the two sets to paths relative to one decoder layer. A path names a module (its
weight and bias are selected) or a parameter (MoE experts stored as one 3-D tensor).

`ffn`/`mha` on an architecture that is not listed is refused: guessing which tensors are "the FFN"
could train the wrong thing, which is worse than an error. Raw sub-module names need no entry.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """The paths, relative to a decoder layer, that stand for each CoFiTune module set."""

    ffn: tuple[str, ...]
    mha: tuple[str, ...]
    attn_out: str | None = None
    """Attention output projection: its input holds the per-head outputs (head gates)."""
    ffn_down: str | None = None
    """FFN down projection: its input is the intermediate neurons, its output the FFN output.
    None where experts are fused tensors with no module to hook: soft masks are refused there."""
    qkv_layout: str = "separate"
    """`separate` q/k/v modules, `concat` one module with rows [q; k; v], or `interleaved` rows
    grouped per head as [q_h, k_h, v_h] (GPT-NeoX)."""
    note: str = ""
    """What differs from the paper's Llama definition, shown in the trainable-parameter report."""

    def module_set(self, name: str) -> tuple[str, ...]:
        return {"ffn": self.ffn, "mha": self.mha}[name]


_LLAMA = Architecture(
    ffn=("mlp.up_proj", "mlp.down_proj"),
    mha=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
)
_PHI3 = Architecture(
    ffn=("mlp.gate_up_proj", "mlp.down_proj"),
    mha=("self_attn.qkv_proj",),
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    qkv_layout="concat",
    note="Phi-3 fuses the gate with the up projection: `ffn` trains the gate rows too.",
)
_GPT_NEOX = Architecture(
    ffn=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    mha=("attention.query_key_value",),
    attn_out="attention.dense",
    ffn_down="mlp.dense_4h_to_h",
    qkv_layout="interleaved",
)
_MOE = Architecture(
    ffn=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    mha=_LLAMA.mha,
    attn_out=_LLAMA.attn_out,
    note="MoE experts fuse gate and up projections: `ffn` trains every expert's gate rows too; "
    "the router stays frozen.",
)
_QWEN2_MOE = Architecture(
    ffn=(*_MOE.ffn, "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
    mha=_LLAMA.mha,
    attn_out=_LLAMA.attn_out,
    note=_MOE.note + " The shared expert's up and down projections count as `ffn`.",
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "olmo2": _LLAMA,
    "granite": _LLAMA,
    "phi3": _PHI3,
    "gpt_neox": _GPT_NEOX,
    "mixtral": _MOE,
    "qwen3_moe": _MOE,
    "qwen2_moe": _QWEN2_MOE,
}


class UnsupportedArchitectureError(ValueError):
    """The model's `model_type` has no entry in `ARCHITECTURES`."""


def architecture_for(model_type: str) -> Architecture:
    """Return the module map of `model_type`, or refuse with the list of supported types."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"cofitune: model_type '{model_type}' is not supported: the plugin does not know which "
            f"of its modules form `ffn` and `mha`. Supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Name its sub-modules instead (e.g. `modules: [fc1, fc2]`), or add the type to "
            "cofitune_plugin/architectures.py."
        ) from None
