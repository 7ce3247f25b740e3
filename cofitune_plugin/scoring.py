"""A model's scores on both axes, read with one set of rules by the search's trials, the
after-training report and the dial: speciality (exact match or held-out NLL) and versatility
(the NLL of the base model's own greedy answers, greedy agreement with them, lm-eval tasks),
with the per-item results the report reads flips from."""

import os
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cofitune_plugin.eval_schema import EvalSettings
from cofitune_plugin.evaluation import (
    TaskResult,
    answer_scores,
    greedy_generate,
    lm_eval_results,
    pooled,
    read_examples,
    speciality,
    speciality_hits,
)


@dataclass
class ModelEval:
    """One model's scores on both axes, with the per-item results flips are read from."""

    speciality: float
    retention_nll: float
    agreement: float
    reproduced: list[bool]
    speciality_hits: list[bool] | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "ModelEval":
        tasks = {name: TaskResult(**task) for name, task in row.pop("tasks").items()}
        return cls(**row, tasks=tasks)

    def task_scores(self) -> dict[str, float]:
        """Each lm-eval task's score, as trial records and dial points keep them."""
        return {task: result.score for task, result in self.tasks.items()}

    def trial_measures(self) -> dict[str, Any]:
        """What a search trial's record keeps of these scores."""
        return {
            "speciality": self.speciality,
            "retention_nll": self.retention_nll,
            "agreement": self.agreement,
            "tasks": self.task_scores(),
        }


class Evaluator:
    """Reads the report's data once and scores models on it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: EvalSettings) -> None:
        self.tokenizer, self.settings = tokenizer, settings
        spec, vers = settings.speciality, settings.versatility
        self.special = read_examples(spec.data, tokenizer, spec.limit)
        self.general = read_examples(vers.prompts, tokenizer, vers.limit)

    def base_answers(self, model: PreTrainedModel) -> list[list[int]]:
        return greedy_generate(
            model,
            self.tokenizer,
            [e.prompt_ids for e in self.general],
            self.settings.versatility.max_new_tokens,
            self.settings.eval_batch_size,
            desc="base answers",
        )

    def evaluate(self, model: PreTrainedModel, answers: list[list[int]]) -> ModelEval:
        spec, batch = self.settings.speciality, self.settings.eval_batch_size
        hits = None
        if spec.metric == "exact_match":
            hits = speciality_hits(
                model, self.tokenizer, self.special, spec.answer_regex, spec.max_new_tokens, batch
            )
            special = sum(hits) / len(hits)
        else:
            special = speciality(
                model, self.tokenizer, self.special, "loss", spec.answer_regex, 1, batch
            )
        scores = answer_scores(
            model,
            [e.prompt_ids for e in self.general],
            answers,
            self.tokenizer.pad_token_id,
            batch,
            desc="versatility",
        )
        retention_nll, agreement = pooled(scores)
        lm_eval = self.settings.versatility.lm_eval
        tasks = (
            lm_eval_results(
                model, self.tokenizer, lm_eval.tasks, lm_eval.include_path, lm_eval.limit, batch
            )
            if lm_eval
            else {}
        )
        return ModelEval(
            speciality=special,
            retention_nll=retention_nll,
            agreement=agreement,
            reproduced=[s.reproduced for s in scores],
            speciality_hits=hits,
            tasks=tasks,
        )

    def prompt_text(self, axis: str, index: int) -> str:
        """The prompt of item `index` of `axis` ("speciality" or "versatility"), without what
        all its prompts share (a chat template's system prompt and role names), shortened."""
        examples = self.special if axis == "speciality" else self.general
        texts = [
            " ".join(self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True).split())
            for e in examples
        ]
        if len(texts) > 1:
            head = len(os.path.commonprefix(texts))
            tail = len(os.path.commonprefix([t[::-1] for t in texts]))
            texts = [t[head : len(t) - tail] or t for t in texts]
        return texts[index].strip()[:120]
