"""The loss-curve PNG of a run (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path


def loss_png(curve: list[list[float]], path: str | Path, *, title: str,
             eval_points: list[list[float]] | None = None) -> Path:
    """Plot ``[[step, loss], ...]`` (and held-out ``[[step, loss], ...]``) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # a Figure, not pyplot: no global figure state

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if curve:
        ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".", label="train loss")
    for step, loss in eval_points or []:
        ax.scatter([step], [loss], color="tab:red", zorder=3)
    if eval_points:
        ax.plot([p[0] for p in eval_points], [p[1] for p in eval_points], color="tab:red", linestyle="--",
                label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
