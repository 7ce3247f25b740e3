"""Exact match against references in the forms users have: bare answers, worked solutions."""

import pytest

from cofitune_plugin.answers import (
    can_extract,
    exact_match,
    extract_answer,
    normalise_answer,
    reference_answer,
)

GSM8K = r"####\s*(-?[\d,]*\.?\d+)"


def test_answers_are_extracted_from_the_last_match_and_normalised():
    assert extract_answer("Step 1: 3 * 400 = 1,200.\n#### 1,200", GSM8K) == "1200"
    assert extract_answer("#### 12 then #### 1200.0", GSM8K) == "1200"
    assert extract_answer("#### 12.50", GSM8K) == "12.5"
    assert extract_answer("no answer here", GSM8K) is None
    assert extract_answer("The answer is: Paris.", r"answer is:\s*(\w+)") == "paris"
    assert normalise_answer("  Paris, France ") == "paris, france"  # commas go from numbers only


@pytest.mark.parametrize(
    ("reference", "answer"),
    [
        ("960", "960"),
        ("1,200", "1200"),
        ("12.5", "12.5"),
        (" 12.50 ", "12.5"),
        ("Paris", "paris"),
        ("Step 1: 3 * 320 = 960.\n#### 960", "960"),  # a worked solution: the regex decides
        ("Step 1: no pattern, 42", "step 1: no pattern, 42"),  # odd, but not an error
    ],
)
def test_a_reference_the_regex_does_not_match_is_taken_whole(reference, answer):
    assert reference_answer(reference, GSM8K) == answer


def test_exact_match_scores_hits_against_bare_and_worked_references():
    predictions = [
        "3 * 320 = 960 #### 960",  # hit: bare reference
        "#### 1200",  # hit: '1,200' is the same number
        "#### 12.50",  # hit: '12.5'
        "#### 961",  # miss: another number
        "960",  # miss: the regex finds no answer in the prediction
        "So #### 6",  # hit: worked-solution reference
    ]
    references = ["960", "1,200", "12.5", "960", "960", "Step 1: 3 * 2 = 6.\n#### 6"]
    assert exact_match(predictions, references, GSM8K) == pytest.approx(4 / 6)
    text = r"answer:\s*(\w+)"
    assert exact_match(["answer: paris", "answer: Rome", "Paris"], ["Paris"] * 3, text) == (
        pytest.approx(1 / 3)
    )


@pytest.mark.parametrize(
    ("reference", "pattern", "possible"),
    [
        ("960", GSM8K, True),
        ("1,200", GSM8K, True),
        ("Step 1: ... #### 6", GSM8K, True),
        ("Paris", GSM8K, False),  # the group captures numbers only
        ("Paris", r"answer:\s*([a-z]+)", True),  # normalised 'paris' fits the group
        ("New York", r"answer:\s*(\w+)", False),  # one word can never be two
        ("x", r"(?:a|b)\((?P<answer>[xy])\)", True),
        ("z", r"[(](?P<answer>[xy])", False),
        ("seven", r"(?<=is )(\d+)", False),
        ("Seven", r"(?i)is (SEVEN|\d+)", True),  # the pattern's flags apply to its group
    ],
)
def test_whether_any_prediction_could_ever_match_a_reference(reference, pattern, possible):
    assert can_extract(reference, pattern) is possible
