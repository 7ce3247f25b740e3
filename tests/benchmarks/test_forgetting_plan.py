"""The forgetting benchmark's stage plan: the jobs a sitting runs are those its methods need
(no importance or search for methods without a mask or the search's selection), and a test
stage's key does not depend on the methods a sitting has picks for, so their records add up."""

import importlib.util
import sys
from pathlib import Path

FORGETTING = Path(__file__).parents[2] / "benchmarks" / "forgetting"
spec = importlib.util.spec_from_file_location("forgetting_main", FORGETTING / "__main__.py")
forgetting = importlib.util.module_from_spec(spec)
spec.loader.exec_module(forgetting)
sys.path.insert(0, str(FORGETTING))
from methods import all_methods  # noqa: E402
from records import run_file, write_record  # noqa: E402


def _plan(tmp_path: Path, names: list[str]) -> tuple[dict, list]:
    plan = forgetting.make_plan("smoke", "dates", "dev", {"records": str(tmp_path / "r")}, None)
    methods = [m for m in all_methods() if m.name in names]
    plan["learning_rates"] = {k: v for k, v in plan["learning_rates"].items() if k in names}
    return plan, methods


def _job_names(tmp_path: Path, names: list[str]) -> list[str]:
    plan, methods = _plan(tmp_path, names)
    jobs = forgetting._jobs(tmp_path, tmp_path / "recipe.yml", tmp_path / "p", plan, methods, False)
    return [job.name for job in jobs]


def test_a_sitting_runs_the_importance_and_search_only_for_methods_that_need_them(tmp_path):
    assert _job_names(tmp_path, ["dft"]) == ["base", "dft@1e-05", "dft@0.0001"]
    assert _job_names(tmp_path, ["cofitune+mask-update"])[:2] == ["base", "importance"]
    assert "search" not in _job_names(tmp_path, ["cofitune+mask-update"])
    names = _job_names(tmp_path, ["full", "cofitune-default"])
    # the default's chain first: the importance and the search, then its runs
    assert names[:4] == ["base", "importance", "search", "cofitune-default@1e-05"]
    unmasked = _job_names(tmp_path, ["cofitune-default-unmasked"])
    assert unmasked[:3] == ["base", "search", "cofitune-default-unmasked@1e-05"]


def test_a_run_with_its_own_curve_starts_first_and_another_methods_curve_moves_nothing(tmp_path):
    plan, methods = _plan(tmp_path, ["full", "cofitune-default"])
    plan["interpolations"] = {"wise-ft": {"learning_rates": [1e-4], "alphas": [0.5]}}
    jobs = forgetting._jobs(tmp_path, tmp_path / "recipe.yml", tmp_path / "p", plan, methods, False)
    names = [job.name for job in jobs]
    assert names.index("full@0.0001") < names.index("full@1e-05")
    assert names.index("cofitune-default@1e-05") < names.index("cofitune-default@0.0001")


def test_the_permuted_control_waits_on_the_importance_it_permutes(tmp_path):
    plan, methods = _plan(tmp_path, ["cofitune-default-permuted"])
    jobs = forgetting._jobs(tmp_path, tmp_path / "recipe.yml", tmp_path / "p", plan, methods, False)
    after = {job.name: job.after for job in jobs}
    assert after["importance-permuted"] == ("importance",)
    assert after["cofitune-default-permuted@1e-05"] == (
        "base",
        "importance",
        "importance-permuted",
        "search",
    )
    assert "importance-permuted" not in _job_names(tmp_path, ["cofitune-default"])


def test_a_test_stages_key_holds_when_later_sittings_pick_more_methods(tmp_path):
    """Test records of full fine-tuning and the default stay comparable when the dev records of
    other methods arrive later: a record is of one method at one rate, and the claim reads the
    row at the current pick, so neither the picks nor the curves' rates are in the key."""

    def key(picks: dict) -> str:
        return forgetting.make_plan("smoke", "dates", "test", {}, picks)["key"]

    first = {"full": [2e-5, 4e-5], "cofitune-default": [4e-5]}
    assert key(first) == key(first | {"lora": [1e-4], "dft": [2e-5]})
    assert key(first) == key(first | {"full": [2e-5, 8e-5]})
    assert key(first) != forgetting.make_plan("smoke", "math", "test", {}, first)["key"]


def test_a_later_sitting_trains_the_default_on_the_committed_search_choice(tmp_path):
    """The search's files go beside the records; a sitting with an empty work dir gets them back
    and does not search again."""
    work, records = tmp_path / "work", tmp_path / "records"
    (work / "search").mkdir(parents=True)
    (work / "search" / "chosen.yml").write_text("layers: 0%-100%\nmodules: ffn\n")
    (work / "search" / "trials.jsonl").write_text("{}\n")
    forgetting._copy_search(work / "search", records / "search")

    later = tmp_path / "later"
    forgetting._copy_search(records / "search", later / "search")
    assert (later / "search" / "chosen.yml").read_text() == "layers: 0%-100%\nmodules: ffn\n"
    plan, methods = _plan(tmp_path, ["cofitune-default"])
    jobs = forgetting._jobs(later, later / "recipe.yml", later / "p", plan, methods, False)
    assert {job.name: job.done() for job in jobs}["search"] is True


def test_each_curve_is_evaluated_where_its_a_is_picked_and_then_checked(tmp_path):
    """Dev: a curve at each of its method's picks, once they exist; test: only the point the
    dev stage chose, where that is a < 1."""

    def curves(stage: str, picks: dict, alphas: dict) -> dict:
        plan = forgetting.make_plan("smoke", "dates", stage, {}, picks, alphas)
        return {
            name: (c["learning_rates"], c["alphas"]) for name, c in plan["interpolations"].items()
        }

    assert curves("dev", {}, {}) == {}
    assert curves("dev", {"full": [1e-4, 1e-5]}, {}) == {
        "wise-ft": ([1e-5, 1e-4], forgetting.ALPHAS)
    }
    picks = {"full": [1e-5, 2e-5], "cofitune-default": [8e-5]}
    assert curves("test", picks, {}) == {}
    alphas = {
        "wise-ft": {"learning_rate": 1e-5, "alpha": 0.75},
        "cofitune-dial": {"learning_rate": 8e-5, "alpha": 1.0},
    }
    assert curves("test", picks, alphas) == {"wise-ft": ([1e-5], [0.75])}


def test_the_test_stage_trains_a_dialled_method_only_where_its_a_was_picked():
    """Full fine-tuning keeps its two best rates on test; the default, once dev picked its
    dial's rate and a, runs at that rate alone (before that, at both of its picks)."""
    picks = {"full": [1e-5, 2e-5], "cofitune-default": [4e-5, 8e-5], "lora": [1e-4]}
    budget = forgetting.BUDGETS["smoke"]
    assert forgetting.stage_rates(budget, "test", picks) == picks
    alphas = {
        "wise-ft": {"learning_rate": 1e-5, "alpha": 0.75},
        "cofitune-dial": {"learning_rate": 8e-5, "alpha": 0.5},
    }
    assert forgetting.stage_rates(budget, "test", picks, alphas) == {
        "full": [1e-5, 2e-5],
        "cofitune-default": [8e-5],
        "lora": [1e-4],
    }


def test_the_test_stage_trains_the_permuted_control_at_the_defaults_rate_too():
    """The importance question at the same step: the permuted mask runs at its own pick and at
    the rate the default's dial was picked at; no control is added where it has no pick."""
    picks = {"cofitune-default": [8e-5, 1.6e-4], "cofitune-default-permuted": [4e-5]}
    budget = forgetting.BUDGETS["smoke"]
    assert forgetting.stage_rates(budget, "test", picks)["cofitune-default-permuted"] == [
        4e-5,
        8e-5,
    ]
    alphas = {"cofitune-dial": {"learning_rate": 1.6e-4, "alpha": 0.75}}
    assert forgetting.stage_rates(budget, "test", picks, alphas) == {
        "cofitune-default": [1.6e-4],
        "cofitune-default-permuted": [4e-5, 1.6e-4],
    }
    del picks["cofitune-default-permuted"]
    assert forgetting.stage_rates(budget, "test", picks, alphas) == {"cofitune-default": [1.6e-4]}


def test_a_run_recorded_without_the_curve_its_plan_asks_is_run_again(tmp_path):
    plan, methods = _plan(tmp_path, ["full"])
    plan["interpolations"] = {"wise-ft": {"learning_rates": [1e-5], "alphas": [0.5]}}
    records = Path(plan["paths"]["records"])

    def done() -> dict[str, bool]:
        jobs = forgetting._jobs(tmp_path, tmp_path / "r.yml", tmp_path / "p", plan, methods, False)
        return {job.name: job.done() for job in jobs if job.name.startswith("full")}

    trained = {"alpha": None}
    write_record(run_file(records, "full", 1e-5, 0), {"runs": [trained]})
    write_record(run_file(records, "full", 1e-4, 0), {"runs": [trained]})
    assert done() == {"full@1e-05": False, "full@0.0001": True}
    write_record(run_file(records, "full", 1e-5, 0), {"runs": [trained, {"alpha": 0.5}]})
    assert done() == {"full@1e-05": True, "full@0.0001": True}


def test_a_pick_over_part_of_its_grid_is_not_settled_and_names_the_rates_it_lacks(tmp_path):
    """A method picked while its dev grid is partial may move: it is left out (dev: no curve;
    test: not run) until the rates named are recorded."""
    grid = forgetting.stage_rates(forgetting.BUDGETS["smoke"], "dev", None)
    trained = {"runs": [{"alpha": None}]}
    for lr in grid["full"]:
        write_record(run_file(tmp_path / "dev", "full", lr, 0), trained)
    write_record(run_file(tmp_path / "dev", "lora", grid["lora"][0], 0), trained)
    picks = {"full": [1e-5, 1e-4], "lora": [grid["lora"][0]]}
    settled, missing = forgetting.settled_picks(picks, grid, tmp_path)
    assert settled == {"full": [1e-5, 1e-4]}
    assert missing == {"lora": grid["lora"][1:]}
