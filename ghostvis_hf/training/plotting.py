"""Learning-curve plots from a Trainer's `log_history` (matplotlib, headless)."""

import json
import os


def plot_learning_curve(log_history: list[dict], path: str, title: str = "GhostVis training", keys=("loss",),
                        annotate: str | None = None) -> str | None:
    """Plots the logged `keys` (e.g. loss, reward) against the step; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            ax.plot(*zip(*points), marker=".", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    if annotate:
        fig.text(0.99, 0.01, annotate, ha="right", va="bottom", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump([e for e in log_history if any(k in e for k in keys)], f)
    return path
