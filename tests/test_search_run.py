"""`axolotl cofitune-search` in its process: what records depend on (`search_header`), and the
memory check that stops a search before anything loads."""

import copy

import pytest

from cofitune_plugin.args import RecipeError
from cofitune_plugin.search_run import search_command, search_header
from helpers import recipe, search_block, write_recipe

RAW = {
    "base_model": "some/model",
    "output_dir": "./out",
    "learning_rate": 2.0e-4,
    "cofitune": {
        "from_search": "./search",
        "search": {
            "trial": {"max_steps": 15},
            "speciality": {"data": "held_out.jsonl"},
            "versatility": {"prompts": "prompts.jsonl"},
        },
    },
}


def _with(path: tuple[str, ...], value) -> dict:
    raw = copy.deepcopy(RAW)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


def test_new_weights_rescore_the_records_but_a_new_trial_budget_does_not():
    """Weights only score trials, so records stay valid under new weights (the search re-scores
    them without training); what a trial trains on or for how long makes new records."""
    header = search_header(RAW)
    weights = ("cofitune", "search", "weights")
    assert search_header(_with(weights, {"speciality": 1.0, "versatility": 3.0})) == header
    assert search_header(_with(("cofitune", "search", "max_trials"), 3)) == header
    assert search_header(_with(("cofitune", "search", "trial"), {"max_steps": 30})) != header
    assert search_header(_with(("learning_rate",), 1.0e-4)) != header


def test_where_and_how_many_at_once_trials_run_does_not_change_what_they_measure():
    header = search_header(RAW)
    where = (
        ("trials", "launch"),
        ("cpu_trials_at_once", 2),
        ("gpus_per_trial", 2),
        ("backend", "ray"),
        ("ray_address", "auto"),
    )
    for key, value in where:
        assert search_header(_with(("cofitune", "search", key), value)) == header


def test_a_search_none_of_whose_first_candidates_fits_stops_before_anything_loads(
    tmp_path, tiny_models
):
    """Every first-level candidate is estimated over `device_memory_gib` (as `axolotl
    cofitune-plan` estimates it): the search stops with each estimate, before any weight loads
    or any record is written."""
    block = search_block(tmp_path, device_memory_gib=1e-6)
    config = write_recipe(tmp_path, recipe(tmp_path, tiny_models["llama"], cofitune=block))
    with pytest.raises(RecipeError, match=r"no candidate of the first level fits") as error:
        search_command(str(config))
    assert "0%-100% x ffn+mha: estimated" in str(error.value)
    assert "GiB per device (single on 1 device(s)), over 1e-06 GiB" in str(error.value)
    assert not (tmp_path / "search").exists()
