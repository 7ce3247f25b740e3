"""What `axolotl cofitune-search` records depend on: `search_header`."""

import copy

from cofitune_plugin.search_run import search_header

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
