"""Wall time of the demo's search with its trials run one at a time in the search's process
(the default on one CPU) against two trials at once, each its own launch of one process
(`cpu_trials_at_once: 2`), on the same demo model and data; and whether both record the same
trials (they must: records do not depend on how many trials ran at once).

Each way runs the whole search from nothing, in its own directory, one after the other; the
order alternates over `--repeats` so that a machine slowing down mid-run does not favour one
way. Results: benchmarks/results/search-groups-cpu.json.

    python -m cofitune_plugin.demo --out demo        # once: the model and its math domain
    python benchmarks/search_groups.py --demo demo --repeats 1
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from machine import describe

from cofitune_plugin.search import SearchRecords, TrialRecord, read_chosen

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "cofitune-smollm2.yml"
WAYS = {
    "one at a time, in process": {},
    "two at once, launched": {"cpu_trials_at_once": 2},
}
MEASURES = ("speciality", "retention_nll", "agreement")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo", help="the demo's --out")
    parser.add_argument("--work", type=Path, default=Path("/tmp/search-groups"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "search-groups-cpu.json"
    )
    return parser.parse_args(argv)


def recipe_for(way: str, run_dir: Path, demo: Path) -> Path:
    """The demo recipe with its paths under `demo`, its search in `run_dir`, and `way`'s keys."""
    text = RECIPE.read_text().replace("./demo/", f"{demo.resolve()}/")
    raw = yaml.safe_load(text)
    raw["cofitune"].pop("soft_mask")  # the search compares selections; masks come after it
    raw["cofitune"].pop("report")
    raw["cofitune"]["search"] |= {"output_dir": str(run_dir / "search"), **WAYS[way]}
    raw["output_dir"] = str(run_dir / "out")
    path = run_dir / "recipe.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_search(way: str, run_dir: Path, demo: Path) -> tuple[float, float]:
    """Seconds of `axolotl cofitune-search` from nothing, and the machine's load average over
    the last 15 minutes when it ended (other work sharing the cores slows both ways)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = recipe_for(way, run_dir, demo)
    axolotl = Path(sys.executable).parent / "axolotl"
    start = time.perf_counter()
    with (run_dir / "driver.log").open("w") as log:
        subprocess.run(
            [str(axolotl), "cofitune-search", str(config)],
            cwd=run_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            check=True,
        )
    return time.perf_counter() - start, os.getloadavg()[2]


def trial_records(run_dir: Path) -> list[TrialRecord]:
    return list(SearchRecords(run_dir / "search").trials().values())


def largest_difference(found: list[TrialRecord], reference: list[TrialRecord]) -> float:
    """The largest relative difference of a measure between two searches' trials (which must
    be the same trials in the same order)."""
    if [r.key for r in found] != [r.key for r in reference]:
        raise AssertionError("the two searches recorded different trials")
    return max(
        abs(getattr(got, m) - getattr(want, m)) / max(abs(getattr(want, m)), 1e-12)
        for got, want in zip(found, reference)
        for m in MEASURES
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    load: dict[str, list[float]] = {way: [] for way in WAYS}
    for repeat in range(args.repeats):
        order = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
        for way in order:
            run_dir = args.work / f"{repeat}-{list(WAYS).index(way)}"
            took, load_average = run_search(way, run_dir, args.demo)
            seconds[way].append(took)
            load[way].append(load_average)
            print(f"{way}: {took:.0f} s (load average {load_average:.1f})", flush=True)
    serial, at_once = (args.work / f"0-{i}" for i in range(2))
    records = trial_records(serial)
    chosen = [read_chosen(d / "search") for d in (serial, at_once)]
    total = {way: sum(s) / len(s) for way, s in seconds.items()}
    serial_way, at_once_way = WAYS
    result = {
        "command": "python benchmarks/search_groups.py " + " ".join(argv or sys.argv[1:]),
        "machine": describe(),
        "trials": len(records),
        "seconds": seconds,
        "load_average_15_min_at_end": load,
        "ratio_at_once_over_serial": total[at_once_way] / total[serial_way],
        "same_choice": chosen[0] == chosen[1],
        "largest_relative_difference": largest_difference(trial_records(at_once), records),
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
