"""`axolotl train` on a CPU with the launcher's one thread against every core (the plugin's fix).

`accelerate launch` exports OMP_NUM_THREADS=1 to the trainer; the plugin's `register` raises it to
cores // local processes unless the user exported OMP_NUM_THREADS (`cofitune_plugin.cpu_threads`).
Exporting OMP_NUM_THREADS=1 therefore reproduces the launcher's setting (what every CPU run got
before the fix), and leaving it unset gives the fix. Both train the same copy of a recipe for
`--steps` steps: the coarse selection of the recipe's `cofitune` block without the search's
`from_search` or a soft mask (both need earlier commands), one log line per step. Seconds per step
are the gaps between the trainer's log lines after the first; CPU use is the CPU time of the
`axolotl train` process tree over the same span, per wall second (200% = two cores).

    python -m cofitune_plugin.demo --out demo   # the demo's model and data, once
    python benchmarks/cpu_threads.py            # the demo recipe, 6 steps each way: ~4 minutes
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from machine import describe

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "cofitune-smollm2.yml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--output", type=Path, default=REPO / "benchmarks" / "results" / "cpu-threads.json"
    )
    return parser.parse_args(argv)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and every descendant alive now (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError):
            continue  # a process that just ended
    return total


def train(recipe: Path, threads: str | None) -> dict:
    """One `axolotl train` run; (wall, CPU) read at each step's log line."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    process = subprocess.Popen(
        [str(bin_dir / "axolotl"), "train", str(recipe)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marks, thread_lines = [], []
    for line in process.stdout:
        if "'loss'" in line:
            marks.append((time.perf_counter(), tree_cpu_seconds(process.pid)))
        if "CPU threads" in line:
            thread_lines.append(line.strip())
    if process.wait() != 0:
        raise SystemExit(f"axolotl train failed (OMP_NUM_THREADS={threads})")
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    span_wall = marks[-1][0] - marks[0][0]
    return {
        "OMP_NUM_THREADS": threads,
        "seconds_per_step": statistics.median(walls),
        "step_seconds": walls,
        "cpu_percent": 100 * (marks[-1][1] - marks[0][1]) / span_wall,
        "plugin_log": thread_lines,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    raw = yaml.safe_load(args.recipe.read_text())
    block = raw["cofitune"]
    raw["cofitune"] = {
        "layers": block.get("layers", "25%-50%"),
        "modules": block.get("modules", "ffn"),
    }
    with tempfile.TemporaryDirectory() as work:
        raw.update(max_steps=args.steps, logging_steps=1, save_strategy="no", output_dir=work)
        recipe = Path(work) / "recipe.yml"
        recipe.write_text(yaml.safe_dump(raw))
        load = os.getloadavg()
        runs = {
            "launcher_one_thread": train(recipe, "1"),
            "every_core": train(recipe, None),
        }
    result = {
        "benchmark": "cpu_threads",
        "recipe": str(args.recipe.relative_to(REPO)),
        "selection": raw["cofitune"],
        "steps": args.steps,
        "machine": describe(),
        "load_average_before_after": [load, os.getloadavg()],
        "runs": runs,
        "speedup": runs["launcher_one_thread"]["seconds_per_step"]
        / runs["every_core"]["seconds_per_step"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, run in runs.items():
        print(f"{name:>20}: {run['seconds_per_step']:.2f} s/step, CPU {run['cpu_percent']:.0f}%")
    print(f"speedup {result['speedup']:.2f}x; load average {load} -> {os.getloadavg()}")
    return result


if __name__ == "__main__":
    main()
