"""Shared by both comparison modes: result folders claimed by their settings, loss-curve plots, versions."""

from __future__ import annotations

import json
from pathlib import Path

from ..util.errors import GiftQuantError

__all__ = ["claim_settings", "package_version", "plot_loss_curves"]
from ..util.files import atomic_write_text


def claim_settings(path: Path, settings: dict, report_dir: Path) -> None:
    normalized = json.loads(json.dumps(settings))
    if path.is_file() and json.loads(path.read_text()) != normalized:
        old = json.loads(path.read_text())
        changed = [k for k in normalized if old.get(k) != normalized[k]]
        raise GiftQuantError(
            f"{report_dir} holds results made with different {', '.join(changed)}; finished methods would not be "
            "comparable: use a new --out (methods may be added freely with the same settings)")
    atomic_write_text(path, json.dumps(settings, indent=1))


def plot_loss_curves(path: Path, curves: dict[str, list[float]]) -> None:
    """One line per labelled training-loss curve, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, losses in curves.items():
        # small batches make per-step losses jumpy: a faint raw line plus a 5-step running mean
        steps = range(1, len(losses) + 1)
        (raw,) = ax.plot(steps, losses, alpha=0.25, lw=1)
        k = min(5, len(losses))
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color=raw.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (faint: per step; bold: 5-step mean)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def package_version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None
