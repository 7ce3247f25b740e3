"""The forgetting benchmark's short-answer domain: every answer is the question's date, in ISO
form, found by the domain's regex; no question is in two splits."""

import datetime
import json
import random
import re

from cofitune_plugin.answers import exact_match_hits
from cofitune_plugin.demo.dates_domain import ANSWER_REGEX, make_example, write_dates_dataset


def test_every_written_form_answers_its_own_date():
    rng = random.Random(1)
    for _ in range(300):
        question, answer = make_example(rng)
        iso = re.search(ANSWER_REGEX, answer).group(1)
        date = datetime.date.fromisoformat(iso)
        us, eu = f"{date.month:02d}/{date.day:02d}/{date.year}", f"{date.day:02d}.{date.month:02d}."
        assert str(date.year) in question
        assert date.strftime("%b") in question or us in question or eu in question


def test_splits_are_disjoint_and_the_answers_score_as_exact_matches(tmp_path):
    paths = write_dates_dataset(tmp_path, n_train=50, n_eval=20, n_dev=10, seed=0)
    questions = {}
    for split in ("train", "eval", "dev"):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        questions[split] = {row["messages"][0]["content"] for row in rows}
        answers = [row["messages"][1]["content"] for row in rows]
        assert exact_match_hits(answers, answers, ANSWER_REGEX) == [True] * len(answers)
    assert [len(q) for q in questions.values()] == [50, 20, 10]
    assert not questions["train"] & (questions["eval"] | questions["dev"])
    assert not questions["eval"] & questions["dev"]


def test_a_date_one_day_off_is_a_miss():
    assert exact_match_hits(
        ["#### 2021-03-06", "#### 2021-03-05"], ["#### 2021-03-05"] * 2, ANSWER_REGEX
    ) == [False, True]
