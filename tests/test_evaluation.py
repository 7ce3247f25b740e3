"""Speciality and versatility measures on a tiny model, checked against their definitions."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from cofitune_plugin.evaluation import (
    answer_scores,
    encode_answer,
    greedy_generate,
    lm_eval_results,
    pooled,
    read_examples,
    speciality,
)
from helpers import build_tiny_model

GSM8K = r"####\s*(-?[\d,]*\.?\d+)"


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory, one_thread):
    path = build_tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_greedy_answers_score_full_agreement_under_the_model_that_wrote_them(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer("Tom buys 3 apples")["input_ids"], tokenizer("Write a poem")["input_ids"]]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert all(len(a) == 6 or a[-1] == tokenizer.eos_token_id for a in answers)
    assert answers == greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)

    nll, agreement = pooled(
        answer_scores(model, prompts, answers, tokenizer.pad_token_id, batch_size=1)
    )
    assert agreement == 1.0  # teacher-forced argmax is, by definition, the greedy token

    expected = []
    for prompt, answer in zip(prompts, answers, strict=True):
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        expected.append(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
    assert nll == pytest.approx((sum(expected) / sum(map(len, answers))).item(), rel=1e-5)


def test_batching_and_padding_do_not_change_the_scores(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(t)["input_ids"] for t in ("Tom buys 3 apples", "A", "Share 12 sweets")]
    answers = [tokenizer(t)["input_ids"] for t in ("#### 6", "Step 1: 7 + 3 = 10.", "x")]
    one = pooled(answer_scores(model, prompts, answers, tokenizer.pad_token_id, batch_size=1))
    three = pooled(answer_scores(model, prompts, answers, tokenizer.pad_token_id, batch_size=3))
    assert three == pytest.approx(one, rel=1e-5)
    alone = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    padded = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert padded == alone


def test_examples_read_chat_and_prompt_rows(tmp_path, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    path = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            {"prompt": "Tom buys", "answer": "#### 6"},
            {"prompt": "Write a poem"},
        ],
    )
    examples = read_examples(path, tokenizer)
    assert [e.answer for e in examples] == ["A", "#### 6", None]
    assert examples[1].prompt_ids == tokenizer("Tom buys")["input_ids"]
    assert len(read_examples(path, tokenizer, limit=2)) == 2

    tokenizer.chat_template = "{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}"
    try:
        chat = read_examples(path, tokenizer)[0]
    finally:
        tokenizer.chat_template = None
    assert chat.prompt_ids == tokenizer("<s>Q</s>", add_special_tokens=False)["input_ids"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: needs a `messages` or a `prompt`"):
        read_examples(bad, tokenizer)


def test_speciality_by_loss_is_the_nll_of_the_reference_answers(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = [
        {"prompt": "Tom buys 3 apples", "answer": "#### 6"},
        {"prompt": "A", "answer": "#### 8"},
    ]
    examples = read_examples(write_jsonl(tmp_path / "e.jsonl", rows), tokenizer)
    loss = speciality(model, tokenizer, examples, "loss", GSM8K, 8, batch_size=2)
    expected, _ = pooled(
        answer_scores(
            model,
            [e.prompt_ids for e in examples],
            [encode_answer(tokenizer, r["answer"]) for r in rows],
            tokenizer.pad_token_id,
            batch_size=1,
        )
    )
    assert loss == pytest.approx(expected, rel=1e-5)
    match = speciality(model, tokenizer, examples, "exact_match", GSM8K, 4, batch_size=2)
    assert match == 0.0  # a random model writes no "#### 6"


def write_tiny_task(tmp_path) -> str:
    """A local multiple-choice task `tiny_general` of three questions; returns its directory."""
    rows = [
        {
            "question": "The capital of France is",
            "choices": [" Paris", " Rome and Milan"],
            "answer": 0,
        },
        {"question": "Anna is", "choices": [" seven years old", " 7"], "answer": 1},
        {"question": "The sea is", "choices": [" blue", " a wind poem"], "answer": 1},
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "tiny_general.yaml").write_text(
        "task: tiny_general\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'rows.jsonl'}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    return str(tmp_path)


def uniform_copy(model):
    """A model with a zeroed output layer: every token equally likely, so in a multiple choice
    task it picks the choice with the fewest tokens (here right on the first two of three)."""
    uniform = copy.deepcopy(model)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    return uniform


def test_lm_eval_local_task_is_scored_by_lm_evals_own_runner(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    include = write_tiny_task(tmp_path)
    results = lm_eval_results(uniform_copy(model), tokenizer, ["tiny_general"], include, None, 2)
    assert {task: result.score for task, result in results.items()} == {
        "tiny_general": pytest.approx(2 / 3)
    }


def test_lm_eval_results_keep_each_documents_score_and_the_standard_error(
    tmp_path, model_and_tokenizer
):
    model, tokenizer = model_and_tokenizer
    include = write_tiny_task(tmp_path)
    result = lm_eval_results(uniform_copy(model), tokenizer, ["tiny_general"], include, None, 2)
    task = result["tiny_general"]
    assert task.items == [1.0, 1.0, 0.0]
    # the sample standard deviation of (1, 1, 0) over sqrt(3): sqrt(1/3) / sqrt(3)
    assert task.stderr == pytest.approx(1 / 3)
    assert task.doc_ids == [0, 1, 2]
    assert task.item_metrics["acc"] == task.items


def test_lm_eval_results_score_only_the_documents_asked_for_under_their_own_ids(
    tmp_path, model_and_tokenizer
):
    """A split's documents: the others are never scored, and each result keeps its id."""
    model, tokenizer = model_and_tokenizer
    include = write_tiny_task(tmp_path)
    result = lm_eval_results(
        uniform_copy(model), tokenizer, ["tiny_general"], include, None, 2, {"tiny_general": [0, 2]}
    )["tiny_general"]
    assert result.doc_ids == [0, 2]
    assert result.items == [1.0, 0.0]
