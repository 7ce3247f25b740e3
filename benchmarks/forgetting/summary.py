"""The benchmark's outputs: results JSON, a Markdown table and a Pareto plot, from the records."""

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from methods import Method  # noqa: E402
from scores import REFERENCE, best_learning_rate, read_runs, uni, versatility  # noqa: E402

from cofitune_plugin.report import pareto_front  # noqa: E402

METRICS = ("exact_match", "heldout_nll", "retention_nll", "agreement", "step_seconds")


def summarize(work: Path, methods: list[Method], machine: dict, command: str) -> dict:
    """Per method: its swept rates, then mean and spread over the seeds at the best rate."""
    base = json.loads((work / "base.json").read_text())
    plan = json.loads((work / "plan.json").read_text())
    rows = {}
    for method in methods:
        if method.kind == "base":
            continue
        runs = read_runs(work, method.name)
        best = best_learning_rate(work, method.name)
        chosen = [r for r in runs if r["learning_rate"] == best]
        rows[method.name] = {
            "description": method.description,
            "learning_rate": best,
            "sweep": {
                str(r["learning_rate"]): r["exact_match"]
                for r in runs
                if r["seed"] == plan["seeds"][0]
            },
            "seeds": [r["seed"] for r in chosen],
            "trainable": chosen[0]["trainable"],
            **{m: _spread([r[m] for r in chosen]) for m in METRICS},
            "versatility": _spread([versatility(r, base) for r in chosen]),
            "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / 2**30,
            "peak_accelerator_gib": _peak_accelerator(runs),
            "runs": chosen,
        }
    reference = rows[REFERENCE]["exact_match"]["mean"]
    for row in rows.values():
        row["speciality"] = _spread(
            [r["exact_match"] / reference for r in row["runs"]] if reference > 0 else [0.0]
        )
        row["uni"] = _spread([uni(r, base, reference) for r in row["runs"]])
    front = pareto_front(
        {
            name: (row["exact_match"]["mean"], row["versatility"]["mean"])
            for name, row in rows.items()
        }
    )
    for name, row in rows.items():
        row["pareto"] = name in front
    return {
        "machine": machine,
        "command": command,
        "plan": plan,
        "base": {k: v for k, v in base.items() if k != "answers"},
        "methods": rows,
    }


def markdown(results: dict) -> str:
    base, rows, plan = results["base"], results["methods"], results["plan"]
    full = rows[REFERENCE]["exact_match"]["mean"]
    machine = results["machine"]
    lines = [
        "# Speciality against versatility: SmolLM2-135M-Instruct on the math domain",
        "",
        f"Made by `{results['command']}` on {machine['description']} "
        f"({machine['date']}); budget `{plan['budget']}`: {plan['training']}.",
        f"Seeds {plan['seeds']}; each method's learning rate is the best Uni of its sweep on "
        f"seed {plan['seeds'][0]}; mean ± standard deviation over the seeds at that rate.",
        "",
        "- **exact match**: held-out math problems, greedy, `#### N` compared "
        f"({plan['evaluation']['speciality_limit']} problems).",
        "- **Spec**: exact match / full fine-tuning's. **Vers**: retention, base NLL / NLL of "
        "the base model's own greedy answers to general prompts "
        f"({plan['evaluation']['prompts_limit']} prompts × {plan['evaluation']['answer_tokens']}"
        " tokens); 1.0 = untouched. **agreement**: share of those answer tokens that are still "
        "the model's greedy choice. **Uni** = (Spec + Vers) / 2.",
        "- **within 5%**: speciality within 5% of full fine-tuning's. **Pareto**: no other "
        "method has both higher exact match and higher Vers.",
        "- **peak RSS**: the method's whole process (model, data, evaluation included).",
        "",
        "| method | lr | trainable | exact match | held-out NLL | Vers | agreement | Spec | Uni "
        "| within 5% | Pareto | s/step | peak RSS GiB |"
        + (" peak GPU GiB |" if _gpu(rows) else ""),
        "|---" * (13 + _gpu(rows)) + "|",
        f"| base | | 0 | {base['exact_match']:.3f} | {base['heldout_nll']:.3f} | 1.000 | 1.000 "
        f"| {base['exact_match'] / full if full else 0:.2f} | | | | | |"
        + (" |" if _gpu(rows) else ""),
    ]
    for name, row in rows.items():
        within = row["exact_match"]["mean"] >= 0.95 * full
        gpu = f" {row['peak_accelerator_gib']:.2f} |" if _gpu(rows) else ""
        lines.append(
            f"| {name} | {row['learning_rate']:g} | {row['trainable']:,} "
            f"| {_fmt(row['exact_match'])} | {_fmt(row['heldout_nll'])} "
            f"| {_fmt(row['versatility'])} | {_fmt(row['agreement'])} "
            f"| {_fmt(row['speciality'], 2)} | {_fmt(row['uni'])} "
            f"| {'yes' if within else 'no'} | {'yes' if row['pareto'] else ''} "
            f"| {row['step_seconds']['mean']:.2f} | {row['peak_rss_gib']:.2f} |{gpu}"
        )
    lines += ["", "Methods:", ""]
    lines += [f"- `{name}`: {row['description']}." for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def pareto_png(results: dict, path: Path) -> None:
    rows = results["methods"]
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    for name, row in rows.items():
        x, y = row["exact_match"], row["versatility"]
        color = "tab:red" if name.startswith("cofitune") else "tab:gray"
        ax.errorbar(
            x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", color=color, capsize=3
        )
        ax.annotate(
            name, (x["mean"], y["mean"]), fontsize=8, xytext=(5, 4), textcoords="offset points"
        )
    base = results["base"]
    ax.scatter(base["exact_match"], 1.0, marker="s", color="black", zorder=3)
    ax.annotate(
        "base", (base["exact_match"], 1.0), fontsize=8, xytext=(5, -10), textcoords="offset points"
    )
    front = sorted(
        (r["exact_match"]["mean"], r["versatility"]["mean"]) for r in rows.values() if r["pareto"]
    )
    ax.plot(
        *zip(*front, strict=True), color="tab:blue", linewidth=1, zorder=1, label="Pareto front"
    )
    ax.set_xlabel("speciality: held-out exact match")
    ax.set_ylabel("versatility: base NLL / NLL of the base's answers")
    ax.set_title(f"SmolLM2-135M-Instruct, math domain ({results['plan']['budget']} budget)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _fmt(spread: dict, digits: int = 3) -> str:
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _peak_accelerator(runs: list[dict]) -> float | None:
    peaks = [r["peak_accelerator_bytes"] for r in runs if r["peak_accelerator_bytes"]]
    return max(peaks) / 2**30 if peaks else None


def _gpu(rows: dict) -> int:
    return int(any(row["peak_accelerator_gib"] for row in rows.values()))
