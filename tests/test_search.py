"""The tree search's logic on a real (meta-device) model's selections: the default tree's path,
an edited space, resumption from records, scoring, and the record file's durability."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cofitune_plugin.args import CoFiTuneConfig, RecipeError, SearchWeights, check_recipe
from cofitune_plugin.search import (
    BaseRecord,
    Candidate,
    SearchError,
    SearchRecords,
    TrialRecord,
    check_levels,
    run_search,
    score_trials,
    split_window,
)
from cofitune_plugin.selection import select
from helpers import recipe, search_block, tiny_config

BASE = BaseRecord(speciality=2.0, retention_nll=1.0, seconds=0.0, fingerprint="f", answers=[])


@pytest.fixture(scope="module")
def resolve():
    """Window x module set -> candidate, resolved on an 8-layer llama built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))

    def resolve(window: str, modules: str) -> Candidate:
        selection = select(model, window, modules)
        return Candidate(window, modules, selection.layers, selection.numel)

    return resolve


def search_config(levels_yaml: str | None = None) -> CoFiTuneConfig:
    block = {"search": {"speciality": {"data": "d"}, "versatility": {"prompts": "p"}}}
    if levels_yaml:
        block["search"]["levels"] = yaml.safe_load(levels_yaml)
    return CoFiTuneConfig.model_validate(block)


def scripted_trials(losses: dict[tuple[str, str], float], log: list[Candidate]):
    """A trial whose held-out loss is looked up by (window, modules); retention is perfect,
    so the search ranks by speciality alone."""

    def run(candidates: list[Candidate]) -> list[TrialRecord]:
        log.extend(candidates)
        return [
            TrialRecord.of(
                candidate,
                speciality=losses.get((candidate.window, candidate.modules), 1.5),
                retention_nll=1.0,
                agreement=1.0,
                train_seconds=0.0,
                eval_seconds=0.0,
            )
            for candidate in candidates
        ]

    return run


def search(config, resolve, losses=None, records=None, max_trials=None):
    """Run the configured tree with scripted trials; returns the result and the trials run."""
    log: list[Candidate] = []
    result = run_search(
        config.search.levels,
        resolve,
        scripted_trials(losses or {}, log),
        records or {},
        lambda: BASE,
        "loss",
        SearchWeights(),
        max_trials=max_trials,
    )
    return result, log


def test_default_tree_visits_whole_and_half_windows_then_halves_then_module_sets(resolve):
    losses = {("25%-75%", "ffn+mha"): 1.0, ("50%-75%", "ffn+mha"): 0.9, ("50%-75%", "ffn"): 0.85}
    config = search_config()
    result, log = search(config, resolve, losses)
    assert [(c.window, c.modules) for c in log] == [
        ("0%-100%", "ffn+mha"),
        ("0%-50%", "ffn+mha"),
        ("25%-75%", "ffn+mha"),
        ("50%-100%", "ffn+mha"),
        ("25%-50%", "ffn+mha"),
        ("50%-75%", "ffn+mha"),
        ("50%-75%", "ffn"),
        ("50%-75%", "mha"),  # ffn+mha in 50%-75% was level 2's trial: not run twice
    ]
    assert [c.layers for c in log[4:6]] == [(2, 3), (4, 5)]
    # Each of the three levels chose a winner: level 2 puts level 1's 25%-75% against its
    # halves, level 3 tries the module sets in level 2's 50%-75%, and level 3's winner is the
    # search's choice.
    assert (result.chosen.window, result.chosen.modules) == ("50%-75%", "ffn")
    assert not result.capped
    assert check_levels(config.search.levels, resolve) == 8  # 4 + 2 + 2: winners not retrained


def test_a_split_keeps_the_window_its_halves_do_not_beat(resolve):
    """Narrowing must earn its place: the whole depth wins level 1, neither half beats it at
    the split, so the module sets are tried over the whole depth."""
    losses = {("0%-100%", "ffn+mha"): 1.0, ("0%-100%", "ffn"): 0.95}
    result, log = search(search_config(), resolve, losses)
    assert [(c.window, c.modules) for c in log[4:]] == [
        ("0%-100%", "ffn"),  # the split's halves, 0%-50% and 50%-100%, were level 1's trials
        ("0%-100%", "mha"),
    ]
    assert (result.chosen.window, result.chosen.modules) == ("0%-100%", "ffn")


def test_an_edited_space_in_yaml_changes_the_trials(resolve):
    config = search_config(
        """
        - {windows: ["0-3", [4, 5, 6, 7]], modules: [ffn]}
        - split
        - {modules: [mha, [up_proj, o_proj]]}
        """
    )
    _, log = search(config, resolve, {("4-7", "ffn"): 1.0, ("6-7", "ffn"): 1.0})
    assert [(c.window, c.modules, c.layers) for c in log] == [
        ("0-3", "ffn", (0, 1, 2, 3)),
        ("4-7", "ffn", (4, 5, 6, 7)),
        ("4-5", "ffn", (4, 5)),
        ("6-7", "ffn", (6, 7)),
        ("6-7", "mha", (6, 7)),
        ("6-7", "up_proj+o_proj", (6, 7)),
    ]


def test_max_trials_stops_the_search_and_chooses_among_what_ran(resolve):
    result, log = search(search_config(), resolve, max_trials=5)
    assert len(log) == 5 and result.capped
    assert result.chosen.key in {c.key for c in log[4:]}


def test_a_resumed_search_reruns_nothing_and_takes_the_same_path(resolve):
    losses = {("0%-50%", "ffn+mha"): 1.0, ("0%-25%", "ffn+mha"): 1.2}
    done, first = search(search_config(), resolve, losses)
    records = {t.key: t for t in done.visited[:4]}  # as if killed after the 4th trial
    again, second = search(search_config(), resolve, losses, records)
    assert [c.key for c in second] == [c.key for c in first[4:]]
    assert again.chosen.key == done.chosen.key


def test_split_halves_depth_windows_at_their_midpoint_and_index_windows_by_layers():
    assert split_window("0%-50%", tuple(range(15))) == ["0%-25%", "25%-50%"]
    assert split_window("25%-50%", (7, 8, 9, 10, 11, 12, 13, 14)) == ["25%-37.5%", "37.5%-50%"]
    assert split_window("10-14", (10, 11, 12, 13, 14)) == ["10-11", "12-14"]
    with pytest.raises(SearchError, match="it has one layer"):
        split_window("3", (3,))


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ("[{windows: split}]", "first level has no winner"),
        ("[{windows: ['0%-50%']}]", "first level has no winner"),
        ("[{windows: [], modules: [ffn]}]", "empty list"),
        ("[]", "at least one level"),
    ],
)
def test_malformed_levels_are_refused_by_the_schema(levels, message):
    cfg = recipe_with_levels(yaml.safe_load(levels))
    with pytest.raises(RecipeError, match=message):
        check_recipe(cfg)


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ("[{windows: ['0-9'], modules: [ffn]}]", r"levels\[1\].*reaches layer 9"),
        ("[{windows: ['0%-50%'], modules: [foo_proj]}]", r"levels\[1\].*\['foo_proj'\] match no"),
        ("[{windows: ['5-5'], modules: [ffn]}, split]", r"levels\[2\].*it has one layer"),
        (
            "[{windows: ['0%-50%'], modules: [ffn]}, {modules: [mlp.up]}]",
            r"levels\[2\].*not a module",
        ),
    ],
)
def test_every_reachable_candidate_is_checked_before_any_trial(resolve, levels, message):
    config = search_config(levels)
    with pytest.raises(SearchError, match=message):
        check_levels(config.search.levels, resolve)


def recipe_with_levels(levels) -> dict:
    cfg = recipe_stub()
    cfg["cofitune"]["search"]["levels"] = levels
    return cfg


def recipe_stub() -> dict:
    return {
        "adapter": "cofitune",
        "cofitune": {"search": {"speciality": {"data": "d"}, "versatility": {"prompts": "p"}}},
    }


def test_search_keys_are_checked_with_the_key_named():
    cfg = recipe_stub()
    cfg["cofitune"]["search"]["trial"] = {"cofitune": {}}
    with pytest.raises(RecipeError, match=r"cofitune.search.trial.*cannot be overridden"):
        check_recipe(cfg)
    cfg = recipe_stub()
    cfg["cofitune"]["search"]["speciality"]["answer_regex"] = "#### \\d+"
    with pytest.raises(RecipeError, match=r"answer_regex.*capture group"):
        check_recipe(cfg)
    cfg = recipe_stub()
    cfg["cofitune"].update(from_search="s", layers="25%-50%")
    with pytest.raises(RecipeError, match="from_search: the search chooses"):
        check_recipe(cfg)


def trial(key: str, speciality: float, retention_nll: float, trainable: int = 1) -> TrialRecord:
    return TrialRecord(key, key, "ffn", [0], trainable, speciality, retention_nll, 1.0, 0.0, 0.0)


def test_trials_measured_under_other_versions_are_refused_naming_both(tmp_path):
    """The search ranks trials against each other: one measured under another Axolotl (0.21
    seeds LoRA, changes checkpointing) or transformers/peft must not join them."""
    records = SearchRecords(tmp_path)
    old = {"axolotl": "0.19.0", "peft": "0.20.0", "transformers": "5.16.1"}
    record = trial("a", 0.5, 1.25)
    record.versions = old
    records.append(record)
    records.check_versions(old)  # the same environment resumes
    new = {"axolotl": "0.21.0", "peft": "0.21.2", "transformers": "5.20.1"}
    with pytest.raises(SearchError) as err:
        records.check_versions(new)
    message = str(err.value)
    assert "axolotl 0.19.0, peft 0.20.0, transformers 5.16.1" in message
    assert "axolotl 0.21.0, peft 0.21.2, transformers 5.20.1" in message
    assert "Point `cofitune.search.output_dir` at a new directory" in message


def test_uni_normalises_speciality_to_the_best_trial_and_versatility_to_the_base():
    trials = [trial("a", 0.5, 1.25), trial("b", 1.0, 1.0)]
    equal = SearchWeights(speciality=1.0, versatility=1.0)
    loss = score_trials(trials, BASE, "loss", equal)
    assert loss["a"].speciality == 1.0 and loss["b"].speciality == 0.5
    assert loss["a"].versatility == pytest.approx(0.8) and loss["b"].versatility == 1.0
    assert loss["a"].uni == pytest.approx(1.8)
    with_tasks = BaseRecord(2.0, 1.0, 0.0, "f", [], tasks={"arc": 0.5})
    trials[0].tasks, trials[1].tasks = {"arc": 0.25}, {"arc": 0.5}
    vers = score_trials(trials, with_tasks, "loss", equal)["a"].versatility
    assert vers == pytest.approx((0.8 + 0.5) / 2)  # mean of retention and task ratios
    match = score_trials(trials, BASE, "exact_match", SearchWeights(speciality=2, versatility=0))
    assert match["a"].uni == pytest.approx(1.0) and match["b"].uni == pytest.approx(2.0)


def test_default_weights_do_not_trade_the_domain_for_what_a_short_trial_keeps():
    """The last level of the benchmark's search (README "Evidence"; 15-step trials, 100 dates):
    `mha` kept more of the base's answers but learned less, and after 100 steps it trailed `ffn`
    by 0.15 exact match. Equal weights chose it; the default weights choose `ffn`."""
    base = BaseRecord(
        speciality=0.0, retention_nll=0.6111, seconds=0.0, fingerprint="f", answers=[]
    )
    level = [trial("ffn", 0.79, 0.6520), trial("mha", 0.76, 0.6265), trial("ffn+mha", 0.79, 0.6860)]
    visited = [trial("0%-50% ffn+mha", 0.80, 0.6695), *level]
    for weights, chosen in (
        (SearchWeights(speciality=1.0, versatility=1.0), "mha"),
        (SearchWeights(), "ffn"),
    ):
        scores = score_trials(visited, base, "exact_match", weights)
        assert max(level, key=lambda t: scores[t.key].uni).key == chosen


def test_records_survive_a_cut_last_line_and_refuse_another_recipe(tmp_path):
    records = SearchRecords(tmp_path / "search")
    header = {
        "recipe": {"learning_rate": 1e-4, "cofitune": {"search": {"trial": {"max_steps": 8}}}}
    }
    records.check_header(header)
    records.append(trial("a", 1.0, 1.0))
    records.append(trial("b", 1.0, 1.0))
    with records.trials_path.open("a") as f:
        f.write('{"key": "c", "win')  # killed mid-write
    assert list(records.trials()) == ["a", "b"]
    assert len(records.trials_path.read_text().splitlines()) == 2

    changed = json.loads(json.dumps(header))
    changed["recipe"]["cofitune"]["search"]["trial"]["max_steps"] = 20
    with pytest.raises(SearchError, match=r"cofitune.search.trial.max_steps: 8 -> 20"):
        records.check_header(changed)
    assert list(records.trials()) == ["a", "b"]  # nothing the user made is lost


def test_search_block_of_the_test_recipe_is_valid(tmp_path, tiny_models):
    cfg = recipe(tmp_path, tiny_models["llama"], cofitune=search_block(tmp_path))
    assert check_recipe(cfg).search.trial == {"max_steps": 2}


def test_a_failed_trial_is_kept_unscored_and_the_level_chooses_among_the_rest(resolve):
    """A crashed trial (its launch left no scores) is a record, never a score: the level's
    winner comes from the trials that finished, and a resumed search does not run it again."""
    config = search_config("[{windows: ['0-3', '4-7'], modules: [ffn]}]")
    crashed = resolve("0-3", "ffn")
    log: list[Candidate] = []
    scripted = scripted_trials({("0-3", "ffn"): 0.5}, log)

    def run(candidates):
        return [
            TrialRecord.failure(c, "exit status -9") if c == crashed else scripted([c])[0]
            for c in candidates
        ]

    args = (config.search.levels, resolve, run)
    result = run_search(*args, {}, lambda: BASE, "loss", SearchWeights())
    assert [t.key for t in result.failed] == [crashed.key]
    assert [t.key for t in result.visited] == ["layers=4-7|modules=ffn"]
    assert result.chosen.window == "4-7" and crashed.key not in result.scores
    records = {t.key: t for t in [*result.failed, *result.visited]}
    log.clear()
    again = run_search(*args, records, lambda: BASE, "loss", SearchWeights())
    assert log == [] and again.chosen.key == result.chosen.key


def test_every_trial_of_the_first_level_failing_stops_the_search(resolve):
    config = search_config("[{windows: ['0-3'], modules: [ffn]}]")

    def crash(candidates):
        return [TrialRecord.failure(c, "exit status 1") for c in candidates]

    with pytest.raises(SearchError, match=r"no trial of the first level produced scores"):
        run_search(config.search.levels, resolve, crash, {}, lambda: BASE, "loss", SearchWeights())


def test_a_refused_candidate_is_skipped_before_it_starts_and_a_level_runs_as_one_batch(resolve):
    """`refuse` (the memory estimate) keeps a candidate from starting; the level's other
    candidates reach `run_trials` together, in candidate order (to run side by side)."""
    config = search_config("[{windows: ['0-3', '0-7', '4-7'], modules: [ffn]}]")
    batches: list[list[str]] = []
    scripted = scripted_trials({}, [])

    def run(candidates):
        batches.append([c.window for c in candidates])
        return scripted(candidates)

    def refuse(candidate):
        return "estimated 9 GiB, over 8 GiB" if candidate.window == "0-7" else None

    result = run_search(
        config.search.levels, resolve, run, {}, lambda: BASE, "loss", SearchWeights(), None, refuse
    )
    assert batches == [["0-3", "4-7"]]
    assert result.skipped == {"layers=0-7|modules=ffn": "estimated 9 GiB, over 8 GiB"}
    assert {t.window for t in result.visited} == {"0-3", "4-7"}
