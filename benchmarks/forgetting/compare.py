"""`python benchmarks/forgetting/compare.py COMMITTED.json RERUN.json`: does a re-run reproduce
a committed table within its spread?

Per method and metric, the re-run's mean is within the spread when it differs from the committed
mean by at most the larger of the two standard deviations over seeds (or, where both are 0, by
1e-6: a deterministic run must repeat itself). Step time is machine load as much as method, so it
is compared but does not decide. Prints a Markdown table, writes it next to RERUN.json as
`reproduction-<budget>.md`, and exits 1 when a deciding metric is outside its spread.
"""

import argparse
import json
import sys
from pathlib import Path

DECIDING = ("spec", "vers_bench", "vers_retention", "exact_match", "heldout_nll", "agreement")
INFORMATIVE = ("step_seconds",)
EXACT = 1e-6


def within_spread(committed: dict, rerun: dict) -> bool:
    return abs(rerun["mean"] - committed["mean"]) <= max(committed["std"], rerun["std"], EXACT)


def compare(committed: dict, rerun: dict, names: tuple[str, str]) -> tuple[list[str], bool]:
    """The comparison's Markdown lines, and whether every deciding metric is within its spread."""
    if committed["budget"] != rerun["budget"]:
        sys.exit("the two results are of different budgets: compare like with like")
    lines = [
        f"# Reproduction of the `{committed['budget']}` table",
        "",
        f"Committed: `{names[0]}` ({committed['date']}). Re-run: `{names[1]}` "
        f"({rerun['date']}), `{rerun['command']}`. "
        "Within spread: |re-run mean - committed mean| <= the larger standard deviation over "
        "seeds. Step time is shown, not judged (it is machine load).",
        "",
        "| method | metric | committed | re-run | difference | within spread |",
        "|---" * 6 + "|",
    ]
    reproduced = True
    rerun_rows = {_key(row): row for row in _rows(rerun)}
    for row in _rows(committed):
        name = " ".join(
            f"{part:g}" if isinstance(part, float) else str(part)
            for part in _key(row)
            if part is not None
        )
        other = rerun_rows.get(_key(row))
        if other is None:
            lines.append(f"| {name} | | | missing | | no |")
            reproduced = False
            continue
        for metric in DECIDING + INFORMATIVE:
            a, b = row[metric], other[metric]
            verdict = "yes" if within_spread(a, b) else "no"
            if metric in DECIDING:
                reproduced &= verdict == "yes"
            else:
                verdict = f"({verdict})"  # shown, not judged
            lines.append(
                f"| {name} | {metric} | {a['mean']:.4f} ± {a['std']:.4f} "
                f"| {b['mean']:.4f} ± {b['std']:.4f} | {b['mean'] - a['mean']:+.4f} | {verdict} |"
            )
    lines += ["", f"**Reproduced: {'yes' if reproduced else 'no'}.**"]
    return lines, reproduced


def _rows(results: dict) -> list[dict]:
    """Every row of every domain and stage, each with its domain and stage."""
    return [
        row | {"domain": domain, "stage": stage}
        for domain, entry in results["domains"].items()
        for stage in ("dev", "test")
        for row in entry.get(stage, {}).get("rows", [])
    ]


def _key(row: dict) -> tuple:
    return row["domain"], row["stage"], row["method"], row["learning_rate"], row["alpha"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("committed", type=Path)
    parser.add_argument("rerun", type=Path)
    args = parser.parse_args()
    committed, rerun = (json.loads(p.read_text()) for p in (args.committed, args.rerun))
    lines, reproduced = compare(committed, rerun, (str(args.committed), str(args.rerun)))
    text = "\n".join(lines) + "\n"
    out = args.rerun.with_name(f"reproduction-{rerun['budget']}.md")
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    sys.exit(0 if reproduced else 1)


if __name__ == "__main__":
    main()
