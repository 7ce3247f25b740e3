"""`python -m cofitune_plugin.demo`: build the demo's model and data offline, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from cofitune_plugin.demo.math_domain import write_math_dataset
from cofitune_plugin.demo.smollm2 import export_smollm2


def main(argv: list[str] | None = None) -> None:
    """Export SmolLM2-135M-Instruct to OUT/smollm2-135m-instruct and write the data to OUT/data."""
    parser = argparse.ArgumentParser(prog="python -m cofitune_plugin.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder")
    parser.add_argument("--n-train", type=int, default=2000, help="training problems")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the math generator")
    parser.add_argument("--data-only", action="store_true", help="skip the model export")
    args = parser.parse_args(argv)

    if not args.data_only:
        model_dir = export_smollm2(args.out / "smollm2-135m-instruct")
        print(f"model: {model_dir}")
    paths = write_math_dataset(args.out / "data", args.n_train, args.n_eval, args.seed)
    for name, path in paths.items():
        n_lines = len(path.read_text(encoding="utf-8").splitlines())
        print(f"{name}: {path} ({n_lines} lines)")


if __name__ == "__main__":
    main()
