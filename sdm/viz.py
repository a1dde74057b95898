"""Figures shared by the notebooks and the CLI."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch
from PIL import Image


def as_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    """PIL image, 3 x H x W tensor in [0, 1], or H x W x 3 array -> H x W x 3 float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    arr = np.asarray(image, dtype=np.float32)
    return arr / 255.0 if arr.max() > 1.0 else arr


def plot_correspondences(
    src_image: Image.Image | torch.Tensor | np.ndarray,
    trg_image: Image.Image | torch.Tensor | np.ndarray,
    src_xy: torch.Tensor | np.ndarray,
    trg_xy: torch.Tensor | np.ndarray,
    *,
    gt_xy: torch.Tensor | np.ndarray | None = None,
    title: str | None = None,
    heatmap: torch.Tensor | np.ndarray | None = None,
) -> Figure:
    """Source and target side by side, matched points joined by lines (one colour per point).

    src_xy, trg_xy: N x 2 pixels in each image's own size; gt_xy (optional): N x 2 true target points,
    drawn as crosses. heatmap (optional): h x w map drawn over the target in a third panel.
    """
    src, trg = as_array(src_image), as_array(trg_image)
    src_xy, trg_xy = np.asarray(src_xy, dtype=float).reshape(-1, 2), np.asarray(trg_xy, dtype=float).reshape(-1, 2)
    n_panels = 3 if heatmap is not None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 5))
    axes[0].imshow(src)
    axes[1].imshow(trg)
    colours = plt.cm.hsv(np.linspace(0, 1, max(len(src_xy), 1), endpoint=False))
    for i, (p, q) in enumerate(zip(src_xy, trg_xy)):
        axes[0].scatter(*p, color=colours[i], s=40, edgecolors="white", linewidths=1)
        axes[1].scatter(*q, color=colours[i], s=40, edgecolors="white", linewidths=1)
        fig.add_artist(ConnectionPatch(p, q, "data", "data", axesA=axes[0], axesB=axes[1], color=colours[i], lw=1, alpha=0.8))
    if gt_xy is not None:
        gt = np.asarray(gt_xy, dtype=float).reshape(-1, 2)
        axes[1].scatter(gt[:, 0], gt[:, 1], c=colours[: len(gt)], marker="x", s=50)
    if heatmap is not None:
        heat = np.asarray(torch.as_tensor(heatmap).float().cpu())
        axes[2].imshow(trg)
        axes[2].imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, trg.shape[1] - 0.5, trg.shape[0] - 0.5, -0.5))
        axes[2].set_title("cosine similarity of point 1")
    for ax in axes:
        ax.axis("off")
    axes[0].set_title("source")
    axes[1].set_title("target")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Saves and closes a figure, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def pck_bar(table: pd.DataFrame, column: str = "per_image@0.1", *, title: str | None = None) -> Figure:
    """Bar chart of one PCK column of a `metrics.pck_table` per category (the "all" bar last)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(table)), 3.5))
    colours = ["tab:gray" if c == "all" else "tab:blue" for c in table.index]
    ax.bar(table.index.astype(str), table[column], color=colours)
    ax.set_ylabel(f"PCK {column} (%)")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=60)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def parse_points(text: str) -> list[tuple[float, float]]:
    """'x,y;x,y' -> [(x, y), ...]; a clear error on anything else."""
    points: list[tuple[float, float]] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        xy = part.split(",")
        try:
            if len(xy) != 2:
                raise ValueError
            points.append((float(xy[0]), float(xy[1])))
        except ValueError:
            raise ValueError(f"cannot read point {part!r}: write points as 'x,y;x,y' in pixels") from None
    if not points:
        raise ValueError("no points given: write them as 'x,y;x,y' in pixels of the source image")
    return points

