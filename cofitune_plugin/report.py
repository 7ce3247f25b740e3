"""The search's report: a Markdown table of every trial and a Pareto plot of the two axes."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: searches run on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from cofitune_plugin.search import (  # noqa: E402
    BaseRecord,
    Candidate,
    Score,
    SearchResult,
    paper_selection,
)
from cofitune_plugin.selection import compact_layers  # noqa: E402


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Keys of the points (x, y) that no other point matches or beats on both axes."""
    return {
        key
        for key, (x, y) in points.items()
        if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points.values())
    }


def _search_front(result: SearchResult) -> set[str]:
    scores = result.scores
    return pareto_front(
        {t.key: (scores[t.key].speciality, scores[t.key].versatility) for t in result.visited}
    )


def markdown_table(
    result: SearchResult,
    base: BaseRecord,
    metric: str,
    total: int,
    paper: Candidate | None = None,
) -> str:
    """One row per trial in visiting order; the chosen one in bold, the Pareto front and the
    paper's default (`paper`, see `search.paper_default`) marked."""
    front = _search_front(result)
    spec_name = "held-out NLL" if metric == "loss" else "exact match"
    tasks = list(base.tasks)
    lines = [
        f"| # | window | modules | layers | trainable | {spec_name} | retention NLL | agreement "
        + "".join(f"| {task} " for task in tasks)
        + "| Spec | Vers | Uni | train s | eval s |",
        "|---" * (13 + len(tasks)) + "|",
        f"| base | | | | 0 | {base.speciality:.4f} | {base.retention_nll:.4f} | 1.0000 "
        + "".join(f"| {base.tasks[task]:.4f} " for task in tasks)
        + f"| | 1.000 | | | {base.seconds:.1f} |",
    ]
    for i, t in enumerate(result.visited, start=1):
        s = result.scores[t.key]
        mark = " (chosen)" if t is result.chosen else (" (Pareto)" if t.key in front else "")
        if paper is not None and t.key == paper.key:
            mark += " (paper's default)"
        row = (
            f"| {i}{mark} | {t.window} | {t.modules} | {compact_layers(t.layers)} "
            f"| {t.trainable:,} ({100 * t.trainable / total:.1f}%) | {t.speciality:.4f} "
            f"| {t.retention_nll:.4f} "
            f"| {t.agreement:.4f} "
            + "".join(f"| {t.tasks[task]:.4f} " for task in tasks)
            + f"| {s.speciality:.3f} | {s.versatility:.3f} | {s.uni:.3f} "
            f"| {t.train_seconds:.1f} | {t.eval_seconds:.1f} |"
        )
        lines.append(row.replace(f"| {i}{mark} |", f"| **{i}{mark}** |") if mark else row)
    return "\n".join(lines)


def versus_paper_default(result: SearchResult, paper: Candidate | None) -> str:
    """One sentence: the chosen selection against the paper's default, when the search
    measured it, so a user sees what the search bought them."""
    window, modules = paper_selection()
    name = f"the paper's default (`{modules}` in `{window}`)"
    if paper is None or paper.key not in result.scores:
        return f"{name[0].upper()}{name[1:]} was not among the trials."
    if paper.key == result.chosen.key:
        return f"The chosen selection is {name}."
    number = next(i for i, t in enumerate(result.visited, start=1) if t.key == paper.key)
    return (
        f"Against {name}, trial {number}: {_scores(result, result.chosen.key)} for the chosen, "
        f"{_scores(result, paper.key)} for the paper's."
    )


def _scores(result: SearchResult, key: str) -> str:
    s = result.scores[key]
    return f"Uni {s.uni:.3f} (Spec {s.speciality:.3f}, Vers {s.versatility:.3f})"


def pareto_plot(result: SearchResult, path: Path) -> None:
    """Normalised speciality against versatility; the Pareto front joined, the chosen starred."""
    front = _search_front(result)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for t in result.visited:
        s = result.scores[t.key]
        chosen = t is result.chosen
        ax.scatter(
            s.speciality,
            s.versatility,
            marker="*" if chosen else "o",
            s=220 if chosen else 40,
            color="tab:red" if chosen else ("tab:blue" if t.key in front else "tab:gray"),
            zorder=3,
        )
        ax.annotate(
            f"{t.window} {t.modules}",
            (s.speciality, s.versatility),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    edge = sorted((result.scores[k].speciality, result.scores[k].versatility) for k in front)
    ax.plot(*zip(*edge, strict=True), color="tab:blue", linewidth=1, zorder=2)
    _finish(
        fig,
        ax,
        "speciality (ratio to the best trial)",
        f"CoFiTune search: chosen {result.chosen.window} {result.chosen.modules}",
        path,
    )


def _finish(fig, ax, xlabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("versatility (base NLL / trial NLL of base answers)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dial_plot(scores: dict[float, Score], path: Path, title: str) -> None:
    """The dial's curve on the search's axes, from a = 0 (the base) to a = 1 (the trained
    model, starred)."""
    alphas = sorted(scores)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs = [scores[a].speciality for a in alphas]
    ys = [scores[a].versatility for a in alphas]
    ax.plot(xs, ys, color="tab:blue", marker="o", linewidth=1, zorder=2)
    for alpha, x, y in zip(alphas, xs, ys, strict=True):
        ax.annotate(f"a={alpha:g}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if 1.0 in scores:
        trained = scores[1.0]
        ax.scatter(
            trained.speciality,
            trained.versatility,
            marker="*",
            s=220,
            color="tab:red",
            zorder=3,
            label="trained (a=1)",
        )
        ax.legend(loc="best", fontsize=8)
    _finish(fig, ax, "speciality (ratio to the best point on the dial)", title, path)
