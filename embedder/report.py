"""`report.md` with PNG plots at the end of `train.py`, from the CSV logger's `metrics.csv`: the loss per task, the
learning rate, queries/s and the evaluation metrics over steps.

matplotlib is optional (`pip install embedder[report]`); without it, or without CSV logs, the report is skipped
with one log line. Plots are drawn with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections import defaultdict

log = logging.getLogger(__name__)

GROUPS = (  # (file stem, title, y label, does a column belong here?)
    ("loss", "Training loss per task", "loss", lambda c: c.startswith("train/") and c.endswith("loss")),
    ("lr", "Learning rate", "lr", lambda c: c.startswith("lr-")),
    ("throughput", "Throughput", "queries/s", lambda c: c.endswith("queries_per_sec")),
    ("eval", "Evaluation", "metric", lambda c: c.startswith("val/")),
)


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """`{column: [(step, value), ...]}` from a Lightning CSV log (rows hold only the columns logged at that step)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for col, value in row.items():
                if col in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    series[col].append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return dict(series)


def latest_metrics_csv(output_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(output_dir, "csv", "version_*", "metrics.csv")), key=os.path.getmtime)
    return found[-1] if found else None


def write_report(output_dir: str, before: dict[str, float] | None = None, after: dict[str, float] | None = None
                 ) -> str | None:
    """Write `<output_dir>/report.md` and `<output_dir>/report/*.png`; returns the report's path, or None (skipped,
    with the reason logged)."""
    path = latest_metrics_csv(output_dir)
    if path is None:
        log.info("no report: no %s/csv/version_*/metrics.csv (logger=csv or many writes it, once a run has logged "
                 "trainer.log_every_n_steps steps)", output_dir)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("no report: matplotlib is not installed (pip install 'embedder[report]')")
        return None
    series = read_metrics(path)
    folder = os.path.join(output_dir, "report")
    os.makedirs(folder, exist_ok=True)
    lines = ["# Training report", "", f"From `{os.path.relpath(path, output_dir)}`.", ""]
    for stem, title, ylabel, belongs in GROUPS:
        cols = sorted(c for c in series if belongs(c))
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for c in cols:
            steps, values = zip(*series[c])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=c)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        png = os.path.join(folder, f"{stem}.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        lines += [f"## {title}", "", f"![{title}](report/{stem}.png)", ""]
    if after:
        lines += ["## Before -> after", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {before[k]:.4f} | {v:.4f} |" if before and k in before else f"| {k} | - | {v:.4f} |"
                  for k, v in sorted(after.items())]
        lines.append("")
    from embedder.atomic import atomic_open

    out = os.path.join(output_dir, "report.md")
    with atomic_open(out, suffix=".md") as f:
        f.write("\n".join(lines))
    log.info("wrote %s", out)
    return out
