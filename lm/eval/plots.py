"""PNG figures of the context evaluations: loss by position (several contexts on one plot) and a passkey
accuracy heatmap. matplotlib with its file-only backend (Agg), imported when a figure is drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lm.eval.passkey import PasskeyReport
from lm.eval.position import PositionLoss
from lm.fileio import atomic_write

__all__ = ["plot_position_loss", "plot_passkey"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_position_loss(results: Sequence[PositionLoss], path: str | Path, title: str = "",
                       train_context: int | None = None) -> Path:
    """Mean loss of each position bucket against the tokens the model has seen (position + 1, log scale), one
    line per context; bucket ``[lo, hi)`` is drawn at ``sqrt((lo + 1) hi)``. Returns ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in results:
        xs = [((lo + 1) * hi) ** 0.5 for lo, hi in zip(r.edges[:-1], r.edges[1:])]
        ax.plot(xs, r.bucket_loss, marker="o", markersize=3, label=f"context {r.context} ({r.num_windows} windows)")
    if train_context is not None:
        ax.axvline(train_context, color="gray", linestyle="--", linewidth=1, label=f"training context {train_context}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens seen (position in the window + 1)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_passkey(report: PasskeyReport, path: str | Path, title: str = "") -> Path:
    """Accuracy per (context, depth) as a heatmap (rows: contexts, columns: depths), each cell annotated.
    Returns ``path``."""
    plt = _pyplot()
    acc = report.accuracy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(report.depths), 1.2 + 0.45 * len(report.contexts)))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(report.depths)), [f"{d:g}" for d in report.depths])
    ax.set_yticks(range(len(report.contexts)), [str(c) for c in report.contexts])
    ax.set_xlabel("needle depth (0 = start of the context, 1 = just before the question)")
    ax.set_ylabel("context (tokens)")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label=f"accuracy ({report.trials} trials per cell)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (a reader never sees half a file; a full disk leaves the
    previous one), then closed."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
