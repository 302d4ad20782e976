"""Pictures and tables of an evaluation: PNGs drawn with matplotlib (Agg, no display), markdown for Prefect.

- speedup bars per model and method against the baseline (the teacher's AR);
- a histogram of per-prompt tokens per forward of each Jacobi pair;
- accuracy against tokens/s, one point per pair (the paper's Figure 6);
- one Jacobi trajectory as the paper's Figure 1: each pass a row, the block as fed, tokens the pass
  committed in green, earlier commits grey, the still-wrong guess red.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cllm_core.engine.rows import RowStep  # noqa: E402
from cllm_core.runtime.records import SummaryRow  # noqa: E402


def speedup_bars(summary: list[SummaryRow], path: Path) -> Path:
    labels = [f"{r.model}\n{r.method}" for r in summary]
    figure, axis = plt.subplots(figsize=(1.4 * len(summary) + 2, 3.6))
    bars = axis.bar(labels, [r.speedup or 0.0 for r in summary],
                    color=["#4c72b0" if r.method == "ar" else "#55a868" if r.method == "jacobi" else "#c44e52"
                           for r in summary])
    axis.bar_label(bars, fmt="%.2fx")
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_ylabel("speedup vs the teacher's AR (wall clock)")
    axis.set_title("Speedup per model and method")
    return _save(figure, path)


def tokens_per_forward_histogram(samples: list[dict], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for model in sorted({r["model"] for r in samples}):
        values = [r["tokens_per_forward"] for r in samples if r["model"] == model and r["method"] == "jacobi"]
        if values:
            axis.hist(values, bins=20, alpha=0.6, label=f"{model} (mean {sum(values) / len(values):.2f})")
            drawn = True
    axis.set_xlabel("tokens per forward (one prompt)")
    axis.set_ylabel("prompts")
    axis.set_title("Jacobi decoding: tokens fixed per forward pass")
    if drawn:
        axis.legend()
    else:  # (an evaluation of AR alone, say: said on the picture, not by a matplotlib warning on the console)
        axis.text(0.5, 0.5, "no Jacobi decodes in this evaluation", ha="center", va="center",
                  transform=axis.transAxes)
    return _save(figure, path)


def accuracy_vs_speed(summary: list[SummaryRow], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in summary:  # a legend, not annotations: near-equal points would stack their labels
        axis.scatter(row.tokens_per_s, 100 * row.accuracy, s=60, alpha=0.8,
                     marker="o" if row.method == "jacobi" else "s" if row.method == "ar" else "^",
                     label=f"{row.model} {row.method}")
    lowest = min(100 * row.accuracy for row in summary)
    axis.set_ylim(max(0.0, lowest - 10), 101)  # a 10-point window: small differences stay small to the eye
    axis.set_xlabel("tokens/s")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("Quality against speed")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def trajectory_figure(rows: list[RowStep], decode, path: Path, title: str, max_passes: int = 24) -> Path:
    """The passes of one prompt (RowSteps of a batch-1 `jacobi_steps`), `decode` turning a token id into text."""
    passes = [r for r in rows if r.state][:max_passes]
    width = max((len(r.state) for r in passes), default=1)
    figure, axis = plt.subplots(figsize=(0.55 * width + 1.5, 0.32 * len(passes) + 1.0))
    for y, step in enumerate(passes):
        done = step.prefix + len(step.committed)
        for x, token in enumerate(step.state):
            color = "#dddddd" if x < step.prefix else "#8fd18f" if x < done else "#f2a3a3"
            axis.text(x, -y, decode(token).replace("\n", "↵")[:4], ha="center", va="center", fontsize=7,
                      family="monospace", bbox={"facecolor": color, "edgecolor": "white", "pad": 1.5})
        axis.text(-1, -y, f"{step.block}:{len(step.committed)}", ha="right", va="center", fontsize=7)
    axis.set_xlim(-2, width)
    axis.set_ylim(-len(passes), 1)
    axis.axis("off")
    axis.set_title(f"{title}: block:tokens committed per pass (green), earlier (grey), still wrong (red)",
                   fontsize=9)
    return _save(figure, path)


def markdown_table(summary: list[SummaryRow]) -> str:
    lines = ["| model | method | tokens/forward | tokens/s | speedup | mean speedup | accuracy | exact match vs AR "
             "| repetition |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r.model} | {r.method} | {r.tokens_per_forward:.2f} | {r.tokens_per_s:.1f} | "
                     f"{_times(r.speedup)} | {_times(r.mean_speedup)} | "
                     f"{r.accuracy:.1%} | {r.exact_match:.1%} | {r.repetition_rate:.1%} |")
    return "\n".join(lines)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
