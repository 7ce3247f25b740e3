"""The JSONL files a search (or a report) scores on: their rows, and the check that reads them at
config time, so a bad file stops with its path and line before a model that takes minutes to load
is loaded.

A row is `{"messages": [...]}` (when the last message is the assistant's, it is the reference
answer and the rest is the prompt) or `{"prompt": "...", "answer": "..."}` (`answer` optional for
general prompts). What a reference may look like, and how it is compared, is `answers.py`'s rule.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cofitune_plugin.answers import can_extract
from cofitune_plugin.eval_schema import RecipeError, SpecialityConfig, VersatilityConfig

_ROW_FORMS = (
    '{"prompt": "...", "answer": "960"} or {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}'
)


class DataFileError(ValueError):
    """A row that cannot be scored; the message says what is missing and the fix."""


@dataclass
class Row:
    """A prompt as chat messages, and its reference answer when it has one."""

    messages: list[dict[str, str]]
    answer: str | None


def read_rows(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, Row]]:
    """(line number, row) for the first `limit` rows of a JSONL file; blank lines are skipped.
    Raises `DataFileError` naming `path:line` for a line that is not a usable row."""
    path = Path(path)
    count = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, parse_row(json.loads(line.strip()))
            except json.JSONDecodeError as exc:
                raise DataFileError(
                    f"{path}:{number}: not JSON ({exc.msg}, column {exc.colno}); write one JSON "
                    f"object per line, e.g. {_ROW_FORMS}"
                ) from None
            except DataFileError as exc:
                raise DataFileError(f"{path}:{number}: {exc}") from None
            count += 1
            if count == limit:
                return
    if count == 0:
        raise DataFileError(f"{path}: no rows; write one JSON object per line, e.g. {_ROW_FORMS}")


def parse_row(row: Any) -> Row:
    """A row's prompt messages and answer, or a `DataFileError` saying what is wrong."""
    if not isinstance(row, dict):
        raise DataFileError(f"not a JSON object; write rows such as {_ROW_FORMS}")
    if "messages" in row:
        messages = row["messages"]
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise DataFileError(
                '`messages` must be a non-empty list of {"role": ..., "content": ...} objects'
            )
        messages = list(messages)
        answer = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
        if not messages:
            raise DataFileError(
                "`messages` holds only an assistant message; add the prompt before it"
            )
        return Row(messages, answer)
    if "prompt" in row:
        prompt, answer = row["prompt"], row.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFileError("`prompt` must be a non-empty string")
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)  # `"answer": 960` is as clear as `"answer": "960"`
        elif answer is not None and not isinstance(answer, str):
            raise DataFileError('`answer` must be a string (or a number), e.g. "answer": "960"')
        return Row([{"role": "user", "content": prompt}], answer)
    raise DataFileError(f"needs a `messages` or a `prompt` field, e.g. {_ROW_FORMS}")


class ScoredOn(Protocol):
    """A block naming the files to score on: `cofitune.search` (or a report's block)."""

    @property
    def speciality(self) -> SpecialityConfig | None: ...

    @property
    def versatility(self) -> VersatilityConfig | None: ...


def check_data_files(config: ScoredOn, key: str) -> list[str]:
    """Read every data file `config` names, as the scorers will (up to each `limit`), before
    anything loads. Raises `RecipeError` naming the YAML key, the file, the line, what is
    missing and the fix; returns warnings to print before the first trial (a held-out set whose
    references no prediction can ever match under `answer_regex`). The regex's capture group is
    checked by the schema itself (`SpecialityConfig`)."""
    warnings = []
    speciality, versatility = config.speciality, config.versatility
    if speciality is not None:
        field = f"{key}.speciality.data"
        rows = _read(field, speciality.data, speciality.limit)
        for number, row in rows:
            if not (row.answer or "").strip():
                raise RecipeError(
                    f"{field}: {speciality.data}:{number}: no reference answer, which "
                    f"`metric: {speciality.metric}` needs; add an `answer` field (e.g. "
                    '"answer": "960") or end `messages` with the assistant\'s answer'
                )
        pattern = speciality.answer_regex
        if speciality.metric == "exact_match" and not any(
            can_extract(row.answer, pattern) for _, row in rows
        ):
            number, first = rows[0]
            warnings.append(
                f"{field}: no prediction can ever match: no reference in {speciality.data} "
                f"holds an answer that `answer_regex` {pattern!r} extracts (line {number}: "
                f"{first.answer[:40]!r}), so every trial scores 0. Make the regex's group "
                "capture answers like these, or use `metric: loss`."
            )
    if versatility is not None:
        _read(f"{key}.versatility.prompts", versatility.prompts, versatility.limit)
    return warnings


def _read(field: str, path: str, limit: int | None) -> list[tuple[int, Row]]:
    if not Path(path).is_file():
        raise RecipeError(f"{field}: no file at {path}; fix the path or write the JSONL file there")
    try:
        return list(read_rows(path, limit))
    except DataFileError as exc:
        raise RecipeError(f"{field}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{field}: {path}: not UTF-8 text ({exc.reason}); save it as UTF-8"
        ) from None
