"""What a model is scored on, as the recipe writes it: the held-out domain data
(`speciality`), the general prompts and lm-eval tasks (`versatility`), and `RecipeError`.

Below both `args.py` (the `cofitune:` block, whose `search` and `report` hold these) and
`datafiles.py` (which reads the files they name at config time), so neither imports the other
back.
"""

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RecipeError(ValueError):
    """A recipe CoFiTune cannot run; the message names the key and the fix."""


class SpecialityConfig(BaseModel):
    """How a trial's domain skill is scored, on held-out JSONL (`messages`, or `prompt` and
    `answer` fields). A reference is a bare answer ("960", "1,200", "12.5", "Paris"), a worked
    solution containing the answer pattern, or a last assistant message holding either."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Held-out domain data, JSONL.")
    metric: Literal["exact_match", "loss"] = Field(
        default="exact_match",
        description="`exact_match` of the answer `answer_regex` extracts from a greedy "
        "generation, or `loss`: the mean NLL of the reference answers.",
    )
    answer_regex: str = Field(
        default=r"####\s*(-?[\d,]*\.?\d+)",
        description="Extracts the final answer (its first group, last match) from each "
        "prediction; GSM8K's `#### N` by default. A reference it matches gives its answer the "
        "same way; a reference it does not match (a bare answer) is taken whole. Both sides are "
        "normalised alike: numbers as numbers ('1,200' = '1200.0'), text without case or "
        "surrounding space.",
    )
    max_new_tokens: int = Field(default=256, ge=1)
    limit: int | None = Field(default=None, ge=1, description="Score only the first N examples.")

    @field_validator("answer_regex")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            groups = re.compile(value).groups
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        if groups < 1:
            raise ValueError("needs a capture group around the answer, e.g. '####\\s*(\\S+)'")
        return value


class LmEvalConfig(BaseModel):
    """lm-evaluation-harness tasks scored on every trial, as a ratio to the base model."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1, description="Task names, e.g. [arc_easy, mmlu].")
    include_path: str | None = Field(
        default=None, description="A directory of your own task YAMLs (local data)."
    )
    limit: int | None = Field(default=None, ge=1, description="Examples per task.")


class VersatilityConfig(BaseModel):
    """Retention of the base model's behaviour on general prompts (JSONL, `prompt` or
    `messages` fields): the NLL of the base model's own greedy answers under the trial's model;
    optionally lm-evaluation-harness tasks too."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(description="General prompts, JSONL.")
    max_new_tokens: int = Field(default=128, ge=1)
    limit: int | None = Field(default=None, ge=1, description="Use only the first N prompts.")
    lm_eval: LmEvalConfig | None = None


class EvalSettings(BaseModel):
    """What a report or the dial scores a model on: a `report` block completed by `search`."""

    speciality: SpecialityConfig
    versatility: VersatilityConfig
    eval_batch_size: int
