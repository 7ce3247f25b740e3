"""The benchmark's outputs from the committed records: results JSON, Markdown, Pareto plot.

Per domain and stage, one row per method, learning rate and (for WiSE-FT and the dial) a, with
the mean and spread over seeds. The dev stage's rows choose each method's rate (`picks`: the
best at matched speciality), then the a of its interpolation at its picked rates (`alpha_picks`,
the same rule: the dial's a for CoFiTune's default, WiSE-FT's for full fine-tuning); the test
stage's rows, on a split no choice has read, answer the
question: at speciality matched to full fine-tuning's, how much general ability does each
method keep? Every comparison is a paired bootstrap over items and seeds
(`cofitune_plugin/stats.py`), and the `claim` states the intervals of (CoFiTune's default -
full fine-tuning at its best rate).
"""

import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from methods import CURVE_OF, INTERPOLATIONS, Method  # noqa: E402
from records import key_of, read_base, read_runs  # noqa: E402
from scores import (  # noqa: E402
    REFERENCE,
    reference_exact_match,
    reference_heldout_nll,
    spec,
    spec_nll,
    vers_bench,
    vers_retention,
)

from cofitune_plugin.matched import SPEC_MATCH, rank_at_matched_speciality  # noqa: E402
from cofitune_plugin.stats import (  # noqa: E402
    Interval,
    bootstrap_draws,
    interval,
    mean_of_seeds,
    paired_bootstrap,
    weakly_dominates,
)

AXES = ("vers_bench", "vers_retention")  # each is judged against spec for domination
METRICS = ("spec", *AXES)
MEASURES = ("exact_match", "heldout_nll", "retention_nll", "agreement", "step_seconds")
# The claim's goal: retention surely above full fine-tuning's, benchmarks at most 0.01 below.
CLAIM_GOAL = {"vers_retention": 0.0, "vers_bench": -0.01}
DEFAULT = "cofitune-default"
# The fine level's questions on the default's selection, each (with, without, where the
# control runs) the thing asked about (`methods.py`): what the update mask adds to the
# selection, and whether its importance beats the same mask at random. The control runs at its
# own dev choice ("pick": matched speciality) or at the default's rate ("rate": the same step,
# so what differs is the importance's information alone).
FINE_LEVEL = {
    "mask": (DEFAULT, "cofitune-default-unmasked", "pick"),
    "importance": (DEFAULT, "cofitune-default-permuted", "pick"),
    "importance_same_rate": (DEFAULT, "cofitune-default-permuted", "rate"),
}


def summarize(
    root: Path, methods: list[Method], machine: dict, command: str, seconds: float
) -> dict:
    """Every domain's stages from the records under `root` (one budget), with the dev
    stage's picks and the test stage's claim."""
    described = {m.name: m for m in methods} | {
        name: Method(name, "interpolation", description=description)
        for name, (_, description) in INTERPOLATIONS.items()
    }
    order = [m.name for m in methods]
    for name, (method, _) in INTERPOLATIONS.items():  # a method's line, then its curve
        order.insert(order.index(method) + 1, name)
    domains = {}
    for directory in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        entry = {}
        for stage in ("dev", "test"):
            if (found := stage_summary(directory / stage, described, order)) is not None:
                entry[stage] = found
        if "dev" in entry:
            entry["dev"]["picks"] = picks(entry["dev"]["rows"])
            entry["dev"]["alpha_picks"] = alpha_picks(entry["dev"]["rows"], entry["dev"]["picks"])
        if "test" in entry:
            dev = entry.get("dev", {})
            entry["claim"] = claim(entry["test"], dev.get("picks", {}), dev.get("alpha_picks", {}))
            entry["fine_level"] = fine_level(
                entry["test"], dev.get("picks", {}), dev.get("alpha_picks", {})
            )
        if entry:
            domains[directory.name] = entry
    return {
        "budget": root.name,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "wall_seconds": seconds,
        "spec_match": SPEC_MATCH,
        "claim_goal": CLAIM_GOAL,
        "domains": domains,
    }


def stage_summary(records: Path, described: dict[str, Method], order: list[str]) -> dict | None:
    """One stage's rows from every record measured under its base's plan, with paired
    intervals and what dominates each row; None when the stage has no base yet."""
    base = read_base(records)
    if base is None:
        return None
    runs, other = read_runs(records, base["plan_key"], key_of(base["answers"]))
    if not any(r["method"] == REFERENCE and r["alpha"] is None for r in runs):
        return {"plan": base["plan"], "base": _base_scores(base), "rows": [], "other": other}
    reference = reference_exact_match(runs)
    reference_nll = reference_heldout_nll(runs)
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["learning_rate"], run["alpha"]), []).append(run)
    rank = {name: i for i, name in enumerate(order)}
    rows = []
    for (name, rate, alpha), chosen in sorted(
        groups.items(), key=lambda item: (rank[item[0][0]], item[0][1], item[0][2] or 0)
    ):
        chosen.sort(key=lambda r: r["seed"])
        rows.append(
            {
                "method": name,
                "learning_rate": rate,
                "alpha": alpha,
                "description": described[name].description,
                "default_recipe": described[name].default_recipe,
                "seeds": [r["seed"] for r in chosen],
                "trainable": chosen[0]["trainable"],
                "spec": _spread([spec(r, base, reference) for r in chosen]),
                "spec_nll": _spread([spec_nll(r, base, reference_nll) for r in chosen]),
                "vers_bench": _spread([vers_bench(r, base) for r in chosen]),
                "vers_retention": _spread([vers_retention(r, base) for r in chosen]),
                "bench": {
                    task: _spread([r["bench"][task] for r in chosen]) for task in base["bench"]
                },
                **{m: _spread([r[m] for r in chosen]) for m in MEASURES},
                "seconds_per_step": statistics.fmean(r["step_seconds"] for r in chosen),
                "peak_rss_gib": max(r["peak_rss_bytes"] for r in chosen) / 2**30,
                "selection": chosen[0].get("selection"),
                "records": [r["provenance"] for r in chosen],
                "items": [r["items"] for r in chosen],
            }
        )
    _bootstrap(rows, base, reference)
    for row in rows:
        row["dominated_by"] = {axis: dominated_by(row, rows, axis) for axis in AXES}
    return {
        "plan": base["plan"],
        "base": _base_scores(base),
        "base_record": {k: base[k] for k in ("commit", "date", "machine")},
        "reference_exact_match": reference,
        "reference_heldout_nll": reference_nll,
        "rows": rows,
        "not_comparable": other,
        "forgetting": _forgetting(rows, base),
    }


def statistics_of(base: dict, reference: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Spec, Vers bench and Vers retention as functions of a row's per-item arrays (`arrays`),
    so that the bootstrap recomputes each exactly as the table reports it."""
    gain = (reference - base["exact_match"]) or 1.0
    bench_base = statistics.fmean(base["bench"].values())
    return {
        "spec": mean_of_seeds(lambda x: (x[..., 0].mean(-1) - base["exact_match"]) / gain),
        "vers_bench": mean_of_seeds(
            lambda x: (x[..., 0] * x[..., 1]).sum(-1) / x[..., 1].sum(-1) / bench_base
        ),
        "vers_retention": mean_of_seeds(lambda x: x[..., 1].sum(-1) / x[..., 0].sum(-1)),
    }


def arrays(row: dict, base: dict) -> dict[str, np.ndarray]:
    """A row's per-item data, (seeds, items, columns) per metric: exact-match hits; each
    benchmark document's hit and weight (1 / (tasks x its task's documents), so the weighted
    mean is the mean of the tasks' accuracies); each general prompt's NLL and the base's."""
    tasks = list(base["bench"])
    weights = np.concatenate(
        [
            np.full(
                len(base["items"]["bench"][t]["doc_ids"]),
                1 / len(base["items"]["bench"][t]["doc_ids"]) / len(tasks),
            )
            for t in tasks
        ]
    )
    base_nll = np.array([nll for nll, _ in base["items"]["retention"]])
    hits, bench, retention = [], [], []
    for items in row["items"]:
        hits.append(np.array(items["exact_match"], dtype=float)[:, None])
        scored = np.concatenate([items["bench"][t]["acc_norm"] for t in tasks])
        bench.append(np.stack([scored, weights], axis=-1))
        nll = np.array([value for value, _ in items["retention"]])
        retention.append(np.stack([nll, base_nll], axis=-1))
    return {
        "spec": np.stack(hits),
        "vers_bench": np.stack(bench),
        "vers_retention": np.stack(retention),
    }


def _bootstrap(rows: list[dict], base: dict, reference: float) -> None:
    """Each row's bootstrap draws per metric (`_draws`), and its per-item data and metric
    functions (`_data`, `_statistics`) for pairing on a subset of its seeds; none is written
    out. Rows with the same seeds share their draws' indices, so a difference of draws is a
    paired bootstrap."""
    functions = statistics_of(base, reference)
    for row in rows:
        data = arrays(row, base)
        row["_draws"] = {m: bootstrap_draws(data[m], functions[m]) for m in METRICS}
        row["_data"], row["_statistics"] = data, functions


def difference(a: dict, b: dict) -> dict[str, Interval] | None:
    """(a - b) per metric, a bootstrap paired over items and the seeds both rows have: the
    rows' own draws when their seeds are the same, else draws of their shared seeds alone;
    None when they share no seed (nothing to pair, so no interval is claimed)."""
    if a["seeds"] == b["seeds"]:
        return {
            m: interval(a[m]["mean"] - b[m]["mean"], a["_draws"][m] - b["_draws"][m])
            for m in METRICS
        }
    shared = [seed for seed in a["seeds"] if seed in b["seeds"]]
    if not shared:
        return None
    return {
        m: paired_bootstrap(
            *(row["_data"][m][[row["seeds"].index(s) for s in shared]] for row in (a, b)),
            a["_statistics"][m],
        )
        for m in METRICS
    }


def _speciality(row: dict) -> float:
    """Matched speciality counts both exact match and held-out NLL (which does not saturate)."""
    return min(row["spec"]["mean"], row["spec_nll"]["mean"])


def _versatility(row: dict) -> float:
    return (row["vers_bench"]["mean"] + row["vers_retention"]["mean"]) / 2


def picks(rows: list[dict]) -> dict[str, list[float]]:
    """Each method's rate for the test stage, chosen on dev rows alone: among its rates with
    Spec and Spec NLL >= SPEC_MATCH, the one with the highest mean of Vers bench and Vers
    retention (else its rate of highest speciality, the lower of the two). The claim's two
    methods, full fine-tuning and CoFiTune's default, keep their two best: each gets its
    interpolation (WiSE-FT, the dial) at both, and a run that learned past the bar can be
    dialled back to it, which the best rate alone may not allow."""
    chosen: dict[str, list[float]] = {}
    for name in dict.fromkeys(r["method"] for r in rows if r["alpha"] is None):
        own = [r for r in rows if r["method"] == name and r["alpha"] is None]
        ranked = rank_at_matched_speciality(own, _speciality, _versatility)
        kept = 2 if name in (REFERENCE, DEFAULT) else 1
        chosen[name] = [r["learning_rate"] for r in ranked[:kept]]
    return chosen


def alpha_picks(rows: list[dict], rates: dict[str, list[float]]) -> dict[str, dict]:
    """Each interpolation's rate and a, among its method's picked rates (full fine-tuning's
    two), by the same rule as the rates: the trained runs (a = 1) and their interpolated points
    there, the most versatile at matched speciality. Only where the dev stage evaluated the
    curve at every picked rate."""
    chosen = {}
    for curve, (method, _) in INTERPOLATIONS.items():
        picked = rates.get(method, [])
        points = [r for r in rows if r["method"] == curve and r["learning_rate"] in picked]
        if not picked or {r["learning_rate"] for r in points} != set(picked):
            continue
        trained = [
            r
            for r in rows
            if r["method"] == method and r["alpha"] is None and r["learning_rate"] in picked
        ]
        # ties go to the trained runs, then to the larger a: the ones that learned more
        candidates = trained + sorted(points, key=lambda r: -r["alpha"])
        best = rank_at_matched_speciality(candidates, _speciality, _versatility)[0]
        chosen[curve] = {"learning_rate": best["learning_rate"], "alpha": best["alpha"] or 1.0}
    return chosen


def dev_picks(records: Path, methods: list[Method]) -> tuple[dict[str, list[float]], dict]:
    """The picks of the dev stage's committed records: each method's rates (`picks`) and each
    interpolation's rate and a among its method's picked rates (`alpha_picks`)."""
    found = stage_summary(
        records,
        {m.name: m for m in methods}
        | {name: Method(name, "interpolation") for name in INTERPOLATIONS},
        [m.name for m in methods] + list(INTERPOLATIONS),
    )
    if not found:
        return {}, {}
    rates = picks(found["rows"])
    return rates, alpha_picks(found["rows"], rates)


def chosen_rate(method: str, picks: dict[str, list[float]], alphas: dict) -> float | None:
    """The rate the dev stage chose for `method`: the one its interpolation's a was picked at
    (the only rate the test stage trains it at), else its first pick."""
    point = alphas.get(CURVE_OF.get(method))
    return point["learning_rate"] if point else (picks.get(method) or [None])[0]


def claimed_row(rows: list[dict], method: str, rate: float | None, alpha: float) -> dict | None:
    """`method`'s row at `rate`, or its interpolation's point at `alpha` when that is below 1."""
    key = (CURVE_OF[method], rate, alpha) if alpha < 1 else (method, rate, None)
    return next((r for r in rows if (r["method"], r["learning_rate"], r["alpha"]) == key), None)


def claim(test: dict, chosen: dict[str, list[float]], alphas: dict[str, dict]) -> dict:
    """(CoFiTune's default - full fine-tuning), each at its dev pick (its rate, then its
    interpolation's a), on the test split: paired 95% intervals per metric, the goal's
    verdict, and the default against every other method at its chosen rate."""
    rows = test["rows"]

    def pick(method: str) -> dict | None:
        point = alphas.get(CURVE_OF[method])
        alpha = point["alpha"] if point else 1.0
        return claimed_row(rows, method, chosen_rate(method, chosen, alphas), alpha)

    default, full = pick(DEFAULT), pick(REFERENCE)
    if default is None or full is None:
        return {
            "met": None,
            "why": "the test stage has no row of the default or of full fine-tuning at its pick",
        }
    against = difference(default, full)
    if against is None:
        return {"met": None, "why": "the default's and full fine-tuning's rows share no seed"}
    versus = {}
    for row in rows:
        if row is not default and (differences := difference(default, row)) is not None:
            versus[_label(row)] = {m: d.as_list() for m, d in differences.items()}
    checks = {axis: against[axis].low > bar for axis, bar in CLAIM_GOAL.items()}
    return {
        "default": _label(default),
        "full": _label(full),
        "seeds": [seed for seed in default["seeds"] if seed in full["seeds"]],  # those paired
        **{m: against[m].as_list() for m in METRICS},
        "estimate": {m: against[m].estimate for m in METRICS},
        "checks": checks,
        "met": all(checks.values()),
        "versus": versus,
    }


def fine_level(test: dict, chosen: dict[str, list[float]], alphas: dict) -> dict:
    """(the selection with - without) what each fine-level question asks about, each trained
    run (a = 1: the question is the mask's, not the dial's) at the rate the dev stage chose for
    it, or the control at the default's (`FINE_LEVEL`), on the test split: paired 95% intervals
    per metric. A question whose rows are not both in the test stage is left out."""
    rows = test["rows"]
    found = {}
    for question, (subject, control, where) in FINE_LEVEL.items():
        rate = chosen_rate(subject, chosen, alphas)
        control_rate = rate if where == "rate" else chosen_rate(control, chosen, alphas)
        with_it = claimed_row(rows, subject, rate, 1.0)
        other = claimed_row(rows, control, control_rate, 1.0)
        if with_it is None or other is None or (against := difference(with_it, other)) is None:
            continue
        found[question] = {
            "with": _label(with_it),
            "control": _label(other),
            "seeds": [seed for seed in with_it["seeds"] if seed in other["seeds"]],
            **{m: against[m].as_list() for m in METRICS},
            "estimate": {m: against[m].estimate for m in METRICS},
        }
    return found


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
        rates = sorted({r["learning_rate"] for r in rows if r["method"] == name})
        for rate in rates:
            curve = sorted(
                (r for r in rows if r["method"] == name and r["learning_rate"] == rate),
                key=lambda r: r["alpha"],
            )
            tuned = [r for r in trained.get(method, []) if r["learning_rate"] == rate]
            lines[name if len(rates) == 1 else f"{name} {rate:g}"] = [origin, *curve, *tuned]
    return lines


def dominated_by(row: dict, rows: list[dict], axis: str) -> list[str]:
    """What lies above `row` on Spec and `axis`: another method's row that weakly dominates it
    on paired intervals (not surely below on either, surely above on one: ties neither win nor
    lose), or a frontier's line (the segment between two of its points, read at this row's
    Spec) above it on both (on the means: a line has no items to pair)."""
    above = []
    for other in rows:
        if other["method"] == row["method"]:
            continue
        differences = difference(other, row)
        if differences is not None and weakly_dominates(
            {"spec": differences["spec"], axis: differences[axis]}
        ):
            above.append(_label(other))
    x, y = row["spec"]["mean"], row[axis]["mean"]
    for name, line in frontiers(rows).items():
        if name.split()[0] == row["method"] or _label(row) in {_label(p) for p in line}:
            continue
        for a, b in zip(line, line[1:], strict=False):
            (x0, y0), (x1, y1) = ((p["spec"]["mean"], p[axis]["mean"]) for p in (a, b))
            if min(x0, x1) < x < max(x0, x1) and y0 + (y1 - y0) * (x - x0) / (x1 - x0) > y:
                above.append(f"the {name} line")
                break
    return sorted(set(above))


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
        if r["method"] == REFERENCE and r["alpha"] is None
    }


def _base_scores(base: dict) -> dict:
    return {k: base[k] for k in ("exact_match", "bench", "heldout_nll", "retention_nll")}


def for_json(results: dict) -> dict:
    """The results without the bootstrap's draws (recomputed from the items on reading)."""
    for entry in results["domains"].values():
        for stage in ("dev", "test"):
            for row in entry.get(stage, {}).get("rows", []):
                for key in ("_draws", "_data", "_statistics"):
                    row.pop(key, None)
    return results


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"# Speciality against versatility where fine-tuning forgets: SmolLM2-135M-Instruct "
        f"(`{results['budget']}` budget)",
        "",
        f"Summarised by `{results['command']}` on {results['date']} from every committed record "
        f"(`benchmarks/results/forgetting/{results['budget']}/`; each row lists the commits and "
        f"dates of its runs in the JSON). Summary machine: {machine['cpu_count']}-core "
        f"{machine['processor']}, torch {machine['torch']}.",
        "",
        "- **Spec**: the share of full fine-tuning's best gain in held-out exact match (greedy, "
        "the domain's answer compared) on the stage's split.",
        "- **Vers bench**: mean accuracy (`acc_norm`) over the stage's split of the general "
        "benchmarks, / the base's: not a distance from the base (a model may beat it).",
        "- **Vers ret.**: base NLL / NLL of the base's own greedy answers to the split's general "
        "prompts; 1.0 = untouched.",
        "- **Spec NLL**: the share of full fine-tuning's best gain in held-out NLL of the "
        "reference answers, which keeps counting where exact match saturates.",
        f"- **dev** picks each method's rate: Spec and Spec NLL >= {SPEC_MATCH}, then the "
        "highest mean of Vers bench and Vers ret.; then, by the same rule, the a of its "
        "interpolation at its picked rates (the dial's, WiSE-FT's; a = 1 is the trained run); "
        "**test** runs the picks on a split no choice has read.",
        "- **dominated by**: a row whose paired 95% interval (bootstrap over items and seeds) "
        "is not below this row's on Spec or the axis and above it on one (ties neither win nor "
        "lose), or a frontier line above it on both (means).",
    ]
    for name, entry in results["domains"].items():
        for stage in ("dev", "test"):
            if stage in entry:
                lines += _stage_markdown(name, stage, entry[stage])
        if entry.get("dev", {}).get("picks"):
            on_curves = "; ".join(
                f"{curve} a = {p['alpha']:g} at {p['learning_rate']:g}"
                + (" (the trained run)" if p["alpha"] == 1 else "")
                for curve, p in entry["dev"]["alpha_picks"].items()
            )
            lines += [
                "",
                f"**Picks** (dev, {name}): "
                + ", ".join(
                    f"{m} {'/'.join(f'{r:g}' for r in rates)}"
                    for m, rates in entry["dev"]["picks"].items()
                )
                + "."
                + (f" On the curves at the picks: {on_curves}." if on_curves else ""),
            ]
        if "claim" in entry:
            lines += _claim_markdown(name, entry["claim"])
        for question, found in entry.get("fine_level", {}).items():
            lines += [
                "",
                f"**Fine level ({name}, {question}; test split, seeds {found['seeds']})**: "
                f"`{found['with']}` - `{found['control']}`: "
                + ", ".join(
                    f"{m} {found['estimate'][m]:+.4f} [{found[m][0]:+.4f}, {found[m][1]:+.4f}]"
                    for m in METRICS
                )
                + ".",
            ]
    if not results["domains"]:
        lines += ["", "**No records yet.**"]
    return "\n".join(lines) + "\n"


def _stage_markdown(domain: str, stage: str, found: dict) -> list[str]:
    plan, base, rows = found["plan"], found["base"], found["rows"]
    tasks = list(base["bench"])
    evaluation = plan["evaluation"]
    items = ", ".join(
        f"{t.removeprefix('langtest_')} {len(ids)}"
        for t, ids in evaluation["bench_doc_ids"].items()
    )
    lines = [
        "",
        f"## {domain}, {stage} split",
        "",
        f"{plan['recipe']['max_steps']} steps of batch {plan['recipe']['micro_batch_size']}, "
        f"{plan['training']}; {evaluation['exact_match_limit']} held-out items, benchmarks "
        f"{items} documents, {evaluation['prompts_limit']} general prompts; seeds {plan['seeds']}.",
        "",
        "| method | lr | a | trainable | exact match | held-out NLL | Spec | Spec NLL | "
        + " | ".join(t.removeprefix("langtest_") for t in tasks)
        + " | Vers bench | Vers ret. | dominated by (bench) | dominated by (ret.) |",
        "|---" * (12 + len(tasks)) + "|",
        f"| base | | | 0 | {base['exact_match']:.3f} | {base['heldout_nll']:.4f} | 0 | 0 | "
        + " | ".join(f"{base['bench'][t]:.3f}" for t in tasks)
        + " | 1 | 1 | | |",
    ]
    for row in rows:
        name = f"**{row['method']}**" if row["default_recipe"] else row["method"]
        lines.append(
            f"| {name} | {row['learning_rate']:g} | {row['alpha'] or ''} | {row['trainable']:,} "
            f"| {_fmt(row['exact_match'])} | {_fmt(row['heldout_nll'], 4)} "
            f"| {_fmt(row['spec'], 2)} | {_fmt(row['spec_nll'], 2)} | "
            + " | ".join(_fmt(row["bench"][t]) for t in tasks)
            + f" | {_fmt(row['vers_bench'])} | {_fmt(row['vers_retention'])} "
            f"| {', '.join(row['dominated_by']['vers_bench'])} "
            f"| {', '.join(row['dominated_by']['vers_retention'])} |"
        )
    if found.get("not_comparable"):
        lines += [
            "",
            f"Not comparable (another plan or base): {len(found['not_comparable'])} records.",
        ]
    return lines


def _claim_markdown(domain: str, found: dict) -> list[str]:
    if found["met"] is None:
        return ["", f"**Claim ({domain})**: not computed: {found['why']}."]
    lines = [
        "",
        f"**Claim ({domain}, test split, seeds {found['seeds']})**: `{found['default']}` - "
        f"`{found['full']}`, paired 95% intervals:",
        "",
        *(
            f"- {m}: {found['estimate'][m]:+.4f} [{found[m][0]:+.4f}, {found[m][1]:+.4f}]"
            for m in METRICS
        ),
        "",
        f"Goal (retention interval above 0, bench interval's lower end above "
        f"{CLAIM_GOAL['vers_bench']}): **{'met' if found['met'] else 'not met'}**.",
    ]
    return lines


def pareto_png(results: dict, path: Path) -> None:
    """One row of panels per domain and stage: Spec against each versatility axis, and retention
    against held-out NLL, where a method that only takes smaller steps lies on full
    fine-tuning's line and one that keeps more for what it learns lies above it; frontiers as
    lines, other methods as points with their spread over seeds."""
    stages = [
        (name, stage, entry[stage])
        for name, entry in results["domains"].items()
        for stage in ("dev", "test")
        if entry.get(stage, {}).get("rows")
    ]
    if not stages:
        return
    fig, panels = plt.subplots(len(stages), 3, figsize=(18, 5.2 * len(stages)), squeeze=False)
    for (name, stage, found), row_panels in zip(stages, panels, strict=True):
        rows = found["rows"]
        for ax, axis in zip(row_panels, AXES, strict=False):
            _draw(ax, rows, lambda p: p["spec"], axis)
            ax.axvline(SPEC_MATCH, color="black", linewidth=0.5, linestyle=":")
            ax.set_xlabel("Spec: share of full fine-tuning's exact-match gain")
            ax.set_ylabel(f"{axis} ({name}, {stage} split)")
        base_nll = _spread([found["base"]["heldout_nll"]])

        def nll(point: dict, base_nll: dict = base_nll) -> dict:
            return base_nll if point["method"] == "base" else point["heldout_nll"]

        ax = row_panels[2]
        _draw(ax, rows, nll, AXES[1])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.invert_xaxis()  # learning more goes right, as on the Spec panels
        ax.set_xlabel("held-out NLL of the reference answers (log; right: learned more)")
        ax.set_ylabel(f"vers_retention ({name}, {stage} split)")
    fig.suptitle(f"SmolLM2-135M-Instruct, `{results['budget']}` budget (dotted: matched Spec)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw(ax, rows: list[dict], x_of: Callable[[dict], dict], axis: str) -> None:
    """The rows on one panel: each frontier as a line, each other row as a point with its
    spread over seeds (CoFiTune's in red, the default a star)."""
    lines = frontiers(rows)
    for line_name, line in lines.items():
        xs = [x_of(p)["mean"] for p in line]
        ys = [p[axis]["mean"] for p in line]
        ax.plot(xs, ys, "-o", markersize=4, label=f"{line_name} (line)", zorder=1)
    on_lines = {_label(p) for line in lines.values() for p in line}
    for i, row in enumerate(rows):
        if _label(row) in on_lines:
            continue
        x, y = x_of(row), row[axis]
        ax.errorbar(
            x["mean"],
            y["mean"],
            xerr=x["std"],
            yerr=y["std"],
            fmt="*" if row["default_recipe"] else "o",
            markersize=12 if row["default_recipe"] else 6,
            color="tab:red" if row["method"].startswith("cofitune") else "tab:gray",
            capsize=3,
        )
        offset = (6, 6) if i % 2 else (6, -12)  # alternate, so close points stay readable
        ax.annotate(
            f"{row['method']} {row['learning_rate']:g}",
            (x["mean"], y["mean"]),
            fontsize=7,
            xytext=offset,
            textcoords="offset points",
        )
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(loc="lower left", fontsize=8)


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
