"""The forgetting benchmark's short-answer domain: every answer is the question's date, in ISO
form, found by the domain's regex (its splits: tests/benchmarks/test_forgetting_splits.py)."""

import datetime
import random
import re

from cofitune_plugin.answers import exact_match_hits
from cofitune_plugin.demo.dates_domain import ANSWER_REGEX, make_example


def test_every_written_form_answers_its_own_date():
    rng = random.Random(1)
    for _ in range(300):
        question, answer = make_example(rng)
        iso = re.search(ANSWER_REGEX, answer).group(1)
        date = datetime.date.fromisoformat(iso)
        us, eu = f"{date.month:02d}/{date.day:02d}/{date.year}", f"{date.day:02d}.{date.month:02d}."
        assert str(date.year) in question
        assert date.strftime("%b") in question or us in question or eu in question


def test_a_date_one_day_off_is_a_miss():
    assert exact_match_hits(
        ["#### 2021-03-06", "#### 2021-03-05"], ["#### 2021-03-05"] * 2, ANSWER_REGEX
    ) == [False, True]
