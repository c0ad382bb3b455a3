"""The loss-curve PNG of a run (matplotlib, headless Agg backend).

What it shows: the training loss per logged step; the held-out loss after training
(a line when there are several points, a marker when there is one); and the base's
held-out loss (the adapter's loss before its first step, when recorded) as a
horizontal line, the level the adapter has to beat.
"""
from __future__ import annotations

from pathlib import Path


def method_label(quantization: str, precision: str) -> str:
    """"LoRA fp32", "LoRA bf16" or "QLoRA nf4": how the run trained, in words."""
    return f"QLoRA {quantization}" if quantization not in (None, "", "none") else f"LoRA {precision}"


def loss_figure(curve: list[list[float]], *, title: str, eval_points: list[list[float]] | None = None,
                base_loss: float | None = None):
    """A matplotlib ``Figure`` (not pyplot: no global figure state) of the run's losses."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if curve:
        ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".", label="train loss")
    points = eval_points or []
    if len(points) == 1:
        ax.plot([points[0][0]], [points[0][1]], color="tab:red", marker="o", linestyle="none",
                label="held-out loss", zorder=3)
    elif points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:red", marker="o", linestyle="--",
                label="held-out loss", zorder=3)
    if base_loss is not None:
        ax.axhline(base_loss, color="tab:gray", linestyle=":", label="base held-out loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even on 2-step runs
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def loss_png(curve: list[list[float]], path: str | Path, *, title: str,
             eval_points: list[list[float]] | None = None, base_loss: float | None = None) -> Path:
    """Plot ``[[step, loss], ...]`` (and held-out ``[[step, loss], ...]``, the base's loss) to ``path``."""
    fig = loss_figure(curve, title=title, eval_points=eval_points, base_loss=base_loss)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
