"""The search report states the chosen selection next to the paper's default when the search
measured it."""

from cofitune_plugin.args import SearchWeights
from cofitune_plugin.report import markdown_table, versus_paper_default
from cofitune_plugin.search import (
    BaseRecord,
    Candidate,
    SearchResult,
    TrialRecord,
    paper_default,
    paper_selection,
    score_trials,
)

BASE = BaseRecord(speciality=0.0, retention_nll=1.0, seconds=0.0, fingerprint="f", answers=[])
PAPER = Candidate("25%-50%", "ffn", (2, 3), 10)
WIDER = Candidate("0%-50%", "ffn+mha", (0, 1, 2, 3), 40)


def record(c: Candidate, speciality: float, retention_nll: float) -> TrialRecord:
    layers = list(c.layers)
    return TrialRecord(
        c.key, c.window, c.modules, layers, c.trainable, speciality, retention_nll, 1.0, 0.0, 0.0
    )


def result(trials: list[TrialRecord], chosen: int) -> SearchResult:
    scores = score_trials(trials, BASE, "exact_match", SearchWeights())
    return SearchResult(trials, scores, trials[chosen])


def test_the_paper_default_is_the_config_default_resolved_on_the_model():
    assert paper_selection() == ("25%-50%", "ffn")
    assert paper_default(lambda window, modules: Candidate(window, modules, (2, 3), 10)) == PAPER

    def too_shallow(window: str, modules: str) -> Candidate:
        raise ValueError("window 25%-50% holds no layer")

    assert paper_default(too_shallow) is None


def test_the_report_compares_the_chosen_with_the_paper_default_when_measured():
    searched = result([record(WIDER, 0.5, 1.25), record(PAPER, 0.25, 1.0)], chosen=0)
    assert versus_paper_default(searched, PAPER) == (
        "Against the paper's default (`ffn` in `25%-50%`), trial 2: Uni 2.800 (Spec 1.000, Vers "
        "0.800) for the chosen, Uni 2.000 (Spec 0.500, Vers 1.000) for the paper's."
    )
    rows = markdown_table(searched, BASE, "exact_match", 100, PAPER).splitlines()
    assert rows[3].startswith("| **1 (chosen)** | 0%-50% | ffn+mha |")
    assert rows[4].startswith("| **2 (Pareto) (paper's default)** | 25%-50% | ffn |")

    chosen_paper = result([record(WIDER, 0.5, 1.25), record(PAPER, 0.25, 1.0)], chosen=1)
    assert versus_paper_default(chosen_paper, PAPER) == (
        "The chosen selection is the paper's default (`ffn` in `25%-50%`)."
    )
    without = result([record(WIDER, 0.5, 1.25)], chosen=0)
    expected = "The paper's default (`ffn` in `25%-50%`) was not among the trials."
    assert versus_paper_default(without, PAPER) == versus_paper_default(without, None) == expected
