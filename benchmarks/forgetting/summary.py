"""The benchmark's outputs: results JSON, a Markdown table and a Pareto plot, from the records."""

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from methods import Method  # noqa: E402
from scores import (  # noqa: E402
    BASE_FILE,
    REFERENCE,
    best_learning_rate,
    read_runs,
    speciality,
    uni,
    versatility,
)

from cofitune_plugin.report import pareto_front  # noqa: E402

METRICS = ("exact_match", "heldout_nll", "retention_nll", "agreement", "step_seconds")


def summarize(work: Path, methods: list[Method], machine: dict, command: str) -> dict:
    """Per method: its swept rates, then mean and spread over the seeds at the best rate."""
    base = json.loads((work / BASE_FILE).read_text())
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
            "sweep": [r for r in runs if r["seed"] == plan["seeds"][0]],
            "seeds": [r["seed"] for r in chosen],
            "trainable": chosen[0]["trainable"],
            **{m: _spread([r[m] for r in chosen]) for m in METRICS},
            "versatility": _spread([versatility(r, base) for r in chosen]),
            "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / 2**30,
            # What training adds over inference in float32: a gradient and AdamW's two moments.
            "training_state_gib": chosen[0]["trainable"] * 12 / 2**30,
            "peak_accelerator_gib": _peak_accelerator(runs),
            "runs": chosen,
        }
    metric = plan["speciality_metric"]
    reference = rows[REFERENCE][metric]["mean"]
    for row in rows.values():
        row["speciality"] = _spread([speciality(r, base, reference, metric) for r in row["runs"]])
        row["uni"] = _spread([uni(r, base, reference, metric) for r in row["runs"]])
        # Copies: the sweep's seed-0 run is also one of `runs`, which carry no Uni of their own.
        row["sweep"] = [{**r, "uni": uni(r, base, reference, metric)} for r in row["sweep"]]
    front = pareto_front(
        {
            name: (row["speciality"]["mean"], row["versatility"]["mean"])
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
    evaluation, machine = plan["evaluation"], results["machine"]
    metric = {"exact_match": "held-out exact match", "heldout_nll": "held-out NLL"}[
        plan["speciality_metric"]
    ]
    gpu = _gpu(rows)
    lines = [
        "# Speciality against versatility: SmolLM2-135M-Instruct on the math domain",
        "",
        f"Made by `{results['command']}` on {machine['description']} ({machine['date']}); "
        f"budget `{plan['budget']}`: {plan['training']}. Seeds {plan['seeds']}: each method's "
        f"learning rate is the best Uni of its sweep on seed {plan['seeds'][0]}; mean ± "
        "standard deviation over the seeds at that rate.",
        "",
        f"- **exact match**: greedy answers to {evaluation['exact_match_limit']} held-out "
        "problems, `#### N` compared. **held-out NLL**: of the reference solutions of "
        f"{evaluation['speciality_limit']} held-out problems.",
        f"- **Spec**: the share of full fine-tuning's gain on the {metric}, (method - base) / "
        "(full - base).",
        "- **Vers**: retention, base NLL / NLL of the base model's own greedy answers to general "
        f"prompts ({evaluation['prompts_limit']} prompts × {evaluation['answer_tokens']} tokens); "
        "1.0 = untouched. **agreement**: share of those tokens still the model's greedy choice.",
        "- **Uni** = (Spec + Vers) / 2. **within 5%**: Spec ≥ 0.95. **Pareto**: no other "
        "method has both a higher Spec and a higher Vers.",
        "- **s/step**: training step time. **peak RSS**: the method's whole process (model, "
        "data and evaluation included); **train state**: computed, 12 bytes per trainable "
        "parameter (float32 gradient and AdamW's two moments)"
        + ("; **peak GPU**: allocated during training." if gpu else "."),
        "",
        "| method | lr | trainable | exact match | held-out NLL | Spec | Vers | agreement | Uni "
        "| within 5% | Pareto | s/step | peak RSS GiB | train state GiB |"
        + (" peak GPU GiB |" if gpu else ""),
        "|---" * (14 + gpu) + "|",
        f"| base | | 0 | {base['exact_match']:.3f} | {base['heldout_nll']:.3f} | 0 | 1.000 "
        "| 1.000 | | | | | | |" + (" |" if gpu else ""),
    ]
    for name, row in rows.items():
        peak = f" {row['peak_accelerator_gib']:.2f} |" if gpu else ""
        lines.append(
            f"| {name} | {row['learning_rate']:g} | {row['trainable']:,} "
            f"| {_fmt(row['exact_match'])} | {_fmt(row['heldout_nll'])} "
            f"| {_fmt(row['speciality'], 2)} | {_fmt(row['versatility'])} "
            f"| {_fmt(row['agreement'])} | {_fmt(row['uni'])} "
            f"| {'yes' if row['speciality']['mean'] >= 0.95 else 'no'} "
            f"| {'yes' if row['pareto'] else ''} "
            f"| {row['step_seconds']['mean']:.2f} | {row['peak_rss_gib']:.2f} "
            f"| {row['training_state_gib']:.3f} |{peak}"
        )
    lines += ["", f"Learning-rate sweep (seed {plan['seeds'][0]}):", ""]
    lines += ["| method | lr | exact match | held-out NLL | Vers | Uni |", "|---" * 6 + "|"]
    for name, row in rows.items():
        for run in row["sweep"]:
            lines.append(
                f"| {name} | {run['learning_rate']:g} | {run['exact_match']:.3f} "
                f"| {run['heldout_nll']:.3f} | {base['retention_nll'] / run['retention_nll']:.3f} "
                f"| {run['uni']:.3f} |"
            )
    lines += ["", "Methods:", ""]
    lines += [f"- `{name}`: {row['description']}." for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def pareto_png(results: dict, path: Path) -> None:
    rows = results["methods"]
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    for i, (name, row) in enumerate(rows.items()):
        x, y = row["speciality"], row["versatility"]
        color = "tab:red" if name.startswith("cofitune") else "tab:gray"
        ax.errorbar(
            x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", color=color, capsize=3
        )
        offset = (6, 6) if i % 2 else (6, -12)  # alternate, so close points stay readable
        ax.annotate(
            name, (x["mean"], y["mean"]), fontsize=8, xytext=offset, textcoords="offset points"
        )
    front = sorted(
        (r["speciality"]["mean"], r["versatility"]["mean"]) for r in rows.values() if r["pareto"]
    )
    ax.plot(
        *zip(*front, strict=True), color="tab:blue", linewidth=1, zorder=1, label="Pareto front"
    )
    metric = results["plan"]["speciality_metric"].replace("_", " ")
    ax.set_xlabel(f"Spec: share of full fine-tuning's gain in {metric}")
    ax.set_ylabel("Vers: base NLL / NLL of the base's own answers")
    ax.set_title(
        f"SmolLM2-135M-Instruct, math domain ({results['plan']['budget']} budget; "
        "base: Spec 0, Vers 1)"
    )
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
