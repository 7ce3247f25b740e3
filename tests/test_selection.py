"""Windows and module sets -> parameter names, on real (tiny) models of each architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cofitune_plugin.architectures import UnsupportedArchitectureError
from cofitune_plugin.selection import (
    SelectionError,
    find_decoder_layers,
    parse_modules,
    resolve_layers,
    select,
)
from helpers import tiny_config


@pytest.mark.parametrize(
    ("num_layers", "expected"), [(40, range(10, 20)), (32, range(8, 16)), (30, range(7, 15))]
)
def test_paper_window_uses_floor_semantics(num_layers, expected):
    assert resolve_layers("25%-50%", num_layers) == list(expected)


def test_half_depth_windows_tile_the_model():
    assert resolve_layers("0%-50%", 30) == list(range(0, 15))
    assert resolve_layers("50%-100%", 30) == list(range(15, 30))
    assert resolve_layers("25% - 75%", 30) == list(range(7, 22))


def test_index_range_is_inclusive_and_list_names_layers():
    assert resolve_layers("10-19", 40) == list(range(10, 20))
    assert resolve_layers([19, 10, 10], 40) == [10, 19]
    assert resolve_layers(3, 8) == [3]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0%-25%", "selects no layer of a 2-layer model"),
        ("50%-40%", "0% <= start < end <= 100%"),
        ("0%-120%", "0% <= start < end <= 100%"),
        ("1-9", "reaches layer 9, but the model has 2 layers"),
        ("5-1", "is empty"),
        ([0, 7], "[7] out of range"),
        ([], "the list is empty"),
        ("middle", "cannot read 'middle'"),
    ],
)
def test_bad_layer_specs_name_the_key_and_fix(spec, message):
    with pytest.raises(SelectionError, match="cofitune.layers") as err:
        resolve_layers(spec, 2)
    assert message in str(err.value)


def test_modules_flatten_and_check_syntax():
    assert parse_modules(["ffn+mha", "o_proj", "ffn"]) == ["ffn", "mha", "o_proj"]
    assert parse_modules("mha") == ["mha"]
    with pytest.raises(SelectionError, match="cofitune.modules: 'mlp.up_proj'"):
        parse_modules(["mlp.up_proj"])


def _tiny(model_type: str) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(model_type))


def _layer_paths(selection) -> set[tuple[int, str]]:
    return set(selection.by_layer_and_module())


_LLAMA_FFN = {"mlp.up_proj", "mlp.down_proj"}
EXPECTED_FFN = {
    **dict.fromkeys(["mistral", "gemma", "gemma3_text", "olmo2", "granite"], _LLAMA_FFN),
    "qwen3_moe": {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"},
    "llama": {"mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"mlp.up_proj", "mlp.down_proj"},
    "qwen3": {"mlp.up_proj", "mlp.down_proj"},
    "gemma2": {"mlp.up_proj", "mlp.down_proj"},
    "phi3": {"mlp.gate_up_proj", "mlp.down_proj"},
    "gpt_neox": {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "mixtral": {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"},
    "qwen2_moe": {
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
    },
}
EXPECTED_MHA = {
    "phi3": {"self_attn.qkv_proj"},
    "gpt_neox": {"attention.query_key_value"},
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED_FFN))
def test_ffn_and_mha_map_to_each_architectures_modules(model_type):
    model = _tiny(model_type)
    ffn = select(model, "25%-50%", ["ffn"])
    assert ffn.layers == (2, 3)
    assert _layer_paths(ffn) == {(i, p) for i in (2, 3) for p in EXPECTED_FFN[model_type]}
    # the gate projection and router never count as `ffn`
    assert not any(".gate_proj" in n or n.endswith("mlp.gate.weight") for n in ffn.parameters)

    mha = select(model, "25%-50%", ["mha"])
    expected = EXPECTED_MHA.get(
        model_type, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    )
    assert _layer_paths(mha) == {(i, p) for i in (2, 3) for p in expected}

    both = select(model, "25%-50%", ["ffn+mha"])
    assert both.parameters == {**ffn.parameters, **mha.parameters}


def test_selection_counts_elements_and_biases():
    model = _tiny("gpt_neox")
    selection = select(model, "0-0", ["ffn"])
    assert selection.parameters == {
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": 64 * 32,
        "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": 64,
        "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": 32 * 64,
        "gpt_neox.layers.0.mlp.dense_4h_to_h.bias": 32,
    }
    assert selection.numel == 2 * 64 * 32 + 64 + 32


def test_raw_module_names_select_those_modules():
    model = _tiny("llama")
    selection = select(model, [1, 5], ["gate_proj", "o_proj"])
    assert set(selection.parameters) == {
        f"model.layers.{i}.{p}.weight"
        for i in (1, 5)
        for p in ("mlp.gate_proj", "self_attn.o_proj")
    }


def test_unknown_raw_module_lists_what_the_layer_has():
    with pytest.raises(SelectionError, match=r"\['w1'\] match no parameter") as err:
        select(_tiny("llama"), "25%-50%", ["w1"])
    assert "gate_proj" in str(err.value)


def test_unmapped_architecture_is_refused_by_name_but_raw_names_work():
    model = _tiny("llama")
    model.config.model_type = "mystery"  # a model type the plugin has no module map for
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'mystery' is not supported"):
        select(model, "25%-50%", ["ffn"])
    assert select(model, "25%-50%", ["up_proj"]).parameters


def test_decoder_layers_are_found_by_count():
    assert find_decoder_layers(_tiny("llama"), 8) == "model.layers"
    assert find_decoder_layers(_tiny("gpt_neox"), 8) == "gpt_neox.layers"
    with pytest.raises(SelectionError, match="exactly one list of 7 decoder layers"):
        find_decoder_layers(_tiny("llama"), 7)


def test_unfrozen_patterns_in_axolotl_dialect_match_exactly_the_selection():
    from axolotl.utils.freeze import LayerNamePattern

    model = _tiny("qwen2")
    selection = select(model, "25%-75%", ["mha"])
    patterns = [LayerNamePattern(p) for p in selection.unfrozen_parameters()]
    matched = {n for n, _ in model.named_parameters() if any(p.match(n) for p in patterns)}
    assert matched == set(selection.parameters)
    assert len(selection.unfrozen_parameters()) == 6  # q/k/v weight + bias, one regex each


def test_report_lists_layers_modules_and_share():
    model = _tiny("llama")
    selection = select(model, "25%-50%", ["ffn"])
    total = sum(p.numel() for p in model.parameters())
    report = selection.report(total)
    assert "layers 2-3" in report
    assert "mlp.up_proj" in report and "mlp.down_proj" in report
    assert f"{selection.numel:,}" in report.splitlines()[-1]
    assert f"{100 * selection.numel / total:.2f}%" in report
