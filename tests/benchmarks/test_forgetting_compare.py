"""The forgetting benchmark's scores (from its records) and its reproduction check (a re-run
against the committed table)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
import compare  # noqa: E402
from scores import reference_exact_match, spec, vers_bench, vers_retention  # noqa: E402

BASE = {"exact_match": 0.2, "retention_nll": 2.0, "bench": {"piqa": 0.6, "siqa": 0.4}}


def _run(method: str, lr: float, seed: int, exact_match: float, alpha: float | None = None):
    return {
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "alpha": alpha,
        "exact_match": exact_match,
    }


def test_spec_is_the_share_of_the_references_gain_and_zero_without_a_gain():
    run = {"exact_match": 0.35}
    assert spec(run, BASE, reference=0.5) == pytest.approx(0.5)  # (0.35 - 0.2) / (0.5 - 0.2)
    assert spec({"exact_match": 0.1}, BASE, reference=0.5) == pytest.approx(-1 / 3)
    assert spec(run, BASE, reference=0.2) == 0.0  # full fine-tuning gained nothing


def test_vers_is_relative_to_the_base_on_benchmarks_and_on_retention():
    run = {"retention_nll": 2.5, "bench": {"piqa": 0.55, "siqa": 0.35}}
    assert vers_bench(run, BASE) == pytest.approx(0.45 / 0.5)  # mean accuracy over the base's
    assert vers_retention(run, BASE) == pytest.approx(2.0 / 2.5)  # a higher NLL: below 1
    assert vers_bench(BASE, BASE) == vers_retention(BASE, BASE) == 1.0


def test_the_spec_reference_is_full_fine_tunings_best_rate_averaged_over_seeds():
    runs = [
        _run("full", 1e-4, 0, 0.50),
        _run("full", 1e-4, 1, 0.40),  # mean 0.45
        _run("full", 1e-5, 0, 0.48),
        _run("full", 1e-5, 1, 0.46),  # mean 0.47: the best rate
        _run("full", 1e-4, 0, 0.90, alpha=0.5),  # a WiSE-FT point, not a full run
        _run("lora", 1e-4, 0, 0.99),
    ]
    assert reference_exact_match(runs) == pytest.approx(0.47)


def _table(budget: str = "cpu", **changes: tuple[float, float]) -> dict:
    """A results file with one CoFiTune row; `changes` set a metric's (mean, std)."""
    metrics = {metric: (0.5, 0.01) for metric in compare.DECIDING + compare.INFORMATIVE}
    metrics.update(changes)
    row = {"method": "cofitune", "learning_rate": 1e-4, "alpha": None}
    row |= {metric: {"mean": mean, "std": std} for metric, (mean, std) in metrics.items()}
    domains = {"dates": {"test": {"rows": [row]}}}
    return {"budget": budget, "date": "2026-11-29", "command": "x", "domains": domains}


def test_within_spread_allows_the_larger_standard_deviation_or_exact_repeats():
    assert compare.within_spread({"mean": 0.5, "std": 0.01}, {"mean": 0.52, "std": 0.03})
    assert not compare.within_spread({"mean": 0.5, "std": 0.01}, {"mean": 0.52, "std": 0.01})
    # a deterministic run must repeat itself, up to float noise
    assert compare.within_spread({"mean": 0.5, "std": 0.0}, {"mean": 0.5 + 1e-7, "std": 0.0})
    assert not compare.within_spread({"mean": 0.5, "std": 0.0}, {"mean": 0.5001, "std": 0.0})


def test_a_rerun_within_its_spread_reproduces_and_every_metric_is_listed():
    lines, reproduced = compare.compare(_table(), _table(spec=(0.505, 0.01)), ("a", "b"))
    assert reproduced
    rows = [line for line in lines if line.startswith("| dates test cofitune 0.0001 |")]
    assert len(rows) == len(compare.DECIDING + compare.INFORMATIVE)
    assert (
        "| dates test cofitune 0.0001 | spec | 0.5000 ± 0.0100 | 0.5050 ± 0.0100 | +0.0050 | yes |"
        in rows
    )
    assert lines[-1] == "**Reproduced: yes.**"


def test_a_deciding_metric_outside_its_spread_fails_and_step_time_does_not_decide():
    slower = _table(step_seconds=(9.0, 0.1))
    lines, reproduced = compare.compare(_table(), slower, ("a", "b"))
    assert reproduced
    assert any(line.startswith("| dates test cofitune 0.0001 | step_seconds |") for line in lines)
    assert any(line.endswith("| (no) |") for line in lines)

    lines, reproduced = compare.compare(_table(), _table(vers_bench=(0.6, 0.01)), ("a", "b"))
    assert not reproduced
    assert any(line.startswith("| dates test cofitune 0.0001 | vers_bench |") for line in lines)
    assert lines[-1] == "**Reproduced: no.**"


def test_a_row_missing_from_the_rerun_fails_and_budgets_must_match():
    rerun = _table()
    rerun["domains"]["dates"]["test"]["rows"][0]["learning_rate"] = (
        1e-5  # another rate: not the committed row
    )
    lines, reproduced = compare.compare(_table(), rerun, ("a", "b"))
    assert not reproduced
    assert "| dates test cofitune 0.0001 | | | missing | | no |" in lines
    with pytest.raises(SystemExit, match="different budgets"):
        compare.compare(_table("cpu"), _table("gpu"), ("a", "b"))


def test_the_command_writes_the_table_beside_the_rerun_and_exits_1_when_not_reproduced(
    tmp_path, monkeypatch
):
    committed, rerun = tmp_path / "committed.json", tmp_path / "rerun" / "results.json"
    rerun.parent.mkdir()
    committed.write_text(json.dumps(_table()))
    rerun.write_text(json.dumps(_table(exact_match=(0.9, 0.01))))
    monkeypatch.setattr(sys, "argv", ["compare.py", str(committed), str(rerun)])
    with pytest.raises(SystemExit) as exit_:
        compare.main()
    assert exit_.value.code == 1
    written = (rerun.parent / "reproduction-cpu.md").read_text()
    assert written.startswith("# Reproduction of the `cpu` table")
    assert (
        "| dates test cofitune 0.0001 | exact_match | 0.5000 ± 0.0100 | 0.9000 ± 0.0100 |"
        in written
    )
