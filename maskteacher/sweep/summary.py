"""``summary.md`` and ``summary.png`` of a sweep folder (and ``results.csv``): :func:`collect`.

The plot shows, per evaluation set, every run's mean best IoU (dots) and each combination's
mean with its spread (bar and error bar), the summary tables' first column.
"""

from __future__ import annotations

import os
from pathlib import Path

from maskteacher.sweep.results import (
    SweepResults,
    combinations_of,
    load_results,
    mean_spread,
    summary_table,
    write_results_csv,
)

PLOT = "summary.png"


def summary_lines(results: SweepResults) -> list[str]:
    """The text of summary.md (no timings and no absolute paths: the same for the same runs)."""
    header = results.header
    finished = results.finished()
    failed = [r for r in results.records if r.status == "failed"]
    lines = [
        "# Sweep summary",
        "",
        f"{len(combinations_of(results))} combinations x seeds {header['seeds']}: "
        f"{len(finished)} runs finished, {len(failed)} failed, {len(results.missing)} not run "
        "yet. Figures: mean ± sample standard deviation over each combination's finished seeds "
        "(everything-mode evaluation of the exported student; `results.csv` has every run).",
    ]
    for name, path in results.evals.items():
        lines += ["", f"## Evaluation set `{name}` ({path})", ""]
        lines += summary_table(results, name)
    lines += ["", "## Combinations", "", "| combination | overrides |", "|---|---|"]
    for c in header["combinations"]:
        sets = " ".join(f"`{k}={v}`" for k, v in c["overrides"]) or "(the config as it is)"
        lines.append(f"| {c['name']} | {sets} |")
    if failed:
        lines += ["", "## Failed runs", "", "| combination | seed | error |", "|---|---|---|"]
        lines += [f"| {r.combination} | {r.seed} | {r.data.get('error', '')} |" for r in failed]
    if results.missing:
        lines += ["", "## Not run yet", ""]
        lines += [", ".join(f"{c} seed {s}" for c, s in results.missing)]
    if finished:
        lines += ["", f"![mean best IoU per combination]({PLOT})"]
    return lines + [""]


def plot_summary(results: SweepResults, path: Path, metric: str = "mean_best_iou") -> None:
    """Per evaluation set: each run's ``metric`` (dots) and the combinations' mean +- spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = combinations_of(results)
    evals = list(results.evals)
    fig, axes = plt.subplots(
        1, len(evals), figsize=(max(4.0, 1.1 * len(names)) * len(evals), 4), dpi=100, squeeze=False
    )
    for ax, eval_name in zip(axes[0], evals):
        for x, name in enumerate(names):
            values = [r.metric(eval_name, metric) for r in results.finished(name)]
            stats = mean_spread(values)
            if stats is None:
                continue
            ax.bar(x, stats[0], yerr=stats[1], color="#9ecae1", capsize=4)
            ax.plot(
                [x] * len([v for v in values if v is not None]),
                [v for v in values if v is not None],
                "k.",
            )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{eval_name}: {metric}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def collect(out: str | os.PathLike[str]) -> SweepResults:
    """Write ``results.csv``, ``summary.md`` and ``summary.png`` from the run folders of ``out``."""
    results = load_results(out)
    write_results_csv(results)
    if results.finished():
        plot_summary(results, results.out / PLOT)
    path = results.out / "summary.md"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(summary_lines(results)))
    tmp.replace(path)
    return results
