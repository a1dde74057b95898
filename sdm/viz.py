"""Figures shared by the notebooks and the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import ConnectionPatch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from sdm.metrics import CATEGORY_MEAN


def _as_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
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
    """Source and target side by side, matched points joined by lines (one colour and one number per point,
    1..N in the order given, the same numbers in every panel); a legend says what each marker is.

    src_xy, trg_xy: N x 2 pixels in each image's own size; gt_xy (optional): N x 2 true target points,
    drawn as crosses. heatmap (optional): h x w map of point 1 drawn over the target in a third panel.
    """
    src, trg = _as_array(src_image), _as_array(trg_image)
    src_xy, trg_xy = np.asarray(src_xy, dtype=float).reshape(-1, 2), np.asarray(trg_xy, dtype=float).reshape(-1, 2)
    n_panels = 3 if heatmap is not None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 5))
    axes[0].imshow(src)
    axes[1].imshow(trg)
    colours = plt.cm.hsv(np.linspace(0, 1, max(len(src_xy), 1), endpoint=False))
    for i, (p, q) in enumerate(zip(src_xy, trg_xy)):
        axes[0].scatter(*p, color=colours[i], s=40, edgecolors="white", linewidths=1)
        axes[1].scatter(*q, color=colours[i], s=40, edgecolors="white", linewidths=1)
        for ax, xy in ((axes[0], p), (axes[1], q)):
            ax.annotate(str(i + 1), xy, xytext=(4, 4), textcoords="offset points", color="white", fontsize=8, weight="bold")
        fig.add_artist(ConnectionPatch(p, q, "data", "data", axesA=axes[0], axesB=axes[1], color=colours[i], lw=1, alpha=0.8))
    if gt_xy is not None:
        gt = np.asarray(gt_xy, dtype=float).reshape(-1, 2)
        axes[1].scatter(gt[:, 0], gt[:, 1], c=colours[: len(gt)], marker="x", s=50)
    if heatmap is not None:
        heat = np.asarray(torch.as_tensor(heatmap).float().cpu())
        axes[2].imshow(trg)
        shown = axes[2].imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, trg.shape[1] - 0.5, trg.shape[0] - 0.5, -0.5))
        fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02, label="cosine similarity")
        axes[2].set_title("similarity of point 1")
    handles = [
        Line2D([], [], ls="", marker="o", color="grey", markeredgecolor="white", label="source point (left) / its match (right)"),
    ]
    if gt_xy is not None:
        handles.append(Line2D([], [], ls="", marker="x", color="grey", label="true target point"))
    for ax in axes:
        ax.axis("off")
    axes[0].set_title("source")
    axes[1].set_title("target")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # under the panels, outside every image, so it never covers a point (save_figure keeps it: bbox "tight")
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8, frameon=False)
    return fig


def figure_path(path: str | Path) -> Path:
    """The file a figure is saved to: `path`, or `path`.png when it has no extension; a ValueError for an
    extension matplotlib cannot write (check this before any long computation)."""
    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"cannot save a figure as {path.suffix!r} ({path}); use one of {', '.join('.' + f for f in sorted(formats))}")
    return path


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Saves and closes a figure, creating the parent folder; returns the file written (`figure_path`)."""
    path = figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def pck_bar(table: pd.DataFrame, column: str = "per_image@0.1", *, title: str | None = None) -> Figure:
    """Bar chart of one PCK column of a `metrics.pck_table` per category (the "all" bar last)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(table)), 3.5))
    colours = ["tab:gray" if c in ("all", CATEGORY_MEAN) else "tab:blue" for c in table.index]  # the summary rows
    # an edge keeps a bar of 0 visible as a line; the value is written on every bar
    bars = ax.bar(table.index.astype(str), table[column], color=colours, edgecolor="black", linewidth=0.6)
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_ylabel(f"PCK {column} (%)")
    ax.set_ylim(0, 105)
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
            x, y = float(xy[0]), float(xy[1])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError
            points.append((x, y))
        except ValueError:
            raise ValueError(f"cannot read point {part!r}: write points as 'x,y;x,y' with finite numbers, in pixels") from None
    if not points:
        raise ValueError("no points given: write them as 'x,y;x,y' in pixels of the source image")
    return points



def heatmap_panels(
    images: list[Image.Image | torch.Tensor | np.ndarray],
    maps: list[torch.Tensor | np.ndarray],
    *,
    points: list[np.ndarray | torch.Tensor | None] | None = None,
    crosses: list[np.ndarray | torch.Tensor | None] | None = None,
    titles: list[str] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    point_label: str | None = None,
    cross_label: str | None = None,
) -> Figure:
    """Maps (h x w, any resolution) drawn over their images, one panel each, laid out row-major.

    points[i] (optional, N x 2 pixels) are drawn as white dots (e.g. a query or a prediction), crosses[i] as
    green crosses (e.g. the ground truth); `point_label` / `cross_label` name them in a legend under the figure.
    """
    n = len(images)
    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 2.8 * nrows), squeeze=False)
    shown = None
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = _as_array(images[i])
        ax.imshow(img)
        if maps[i] is not None:
            heat = np.asarray(torch.as_tensor(maps[i]).float().cpu())
            h, w = img.shape[:2]
            shown = ax.imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=vmin, vmax=vmax)
            if vmin is None or vmax is None:  # each panel on its own scale: each its own bar
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        for marks, style in ((points, dict(c="white", edgecolors="black", s=40)), (crosses, dict(c="lime", marker="x", s=50))):
            if marks is not None and marks[i] is not None:
                xy = np.asarray(torch.as_tensor(marks[i]).float().cpu()).reshape(-1, 2)
                ax.scatter(xy[:, 0], xy[:, 1], **style)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    handles = [Line2D([], [], ls="", marker="o", color="white", markeredgecolor="black", label=point_label)] if point_label else []
    if cross_label:
        handles.append(Line2D([], [], ls="", marker="x", color="lime", label=cross_label))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))  # the title keeps clear of the first row's titles
    if shown is not None and vmin is not None and vmax is not None:  # one shared scale: one bar for all panels
        fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    if handles:
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8, frameon=False)
    return fig


def table_heatmap(table: pd.DataFrame, *, title: str | None = None, vmin: float = 0.0, vmax: float = 100.0, fmt: str = "{:.1f}") -> Figure:
    """A numeric table (e.g. `evaluate.paper_table`: methods x categories) as an annotated heatmap."""
    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * table.shape[1] + 2), max(2, 0.45 * table.shape[0] + 1.2)))
    im = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index], fontsize=8)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7, color="white" if v < (vmin + vmax) / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def grouped_bar(table: pd.DataFrame, *, ylabel: str = "PCK@0.1 (%)", title: str | None = None, ylim: tuple[float, float] | None = (0, 100)) -> Figure:
    """Bars of a table: one group per row (index), one bar per column, values written on the bars; missing
    values (NaN) get no bar and no label, and columns with no value at all are left out."""
    table = table.dropna(axis=1, how="all")
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(table) * max(1, len(table.columns)) ** 0.5), 3.8))
    table.plot.bar(ax=ax, rot=0 if len(table) < 5 else 30, width=0.8)
    if len(table) >= 5:
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    for container, column in zip(ax.containers, table.columns):
        ax.bar_label(container, labels=[f"{v:.1f}" if np.isfinite(v) else "" for v in table[column].to_numpy(dtype=float)], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    if ylim:
        ax.set_ylim(*ylim)
    if len(table.columns) > 1:
        ax.legend(fontsize=8)
    elif ax.get_legend() is not None:
        ax.get_legend().remove()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def line_plot(
    x: list[Any] | np.ndarray,
    series: dict[str, list[float] | np.ndarray],
    *,
    xlabel: str,
    ylabel: str = "PCK@0.1 (%)",
    title: str | None = None,
    ylim: tuple[float, float] | None = (0, 100),
) -> Figure:
    """One line with markers per series over shared x values. Each series has its own marker, dash and marker
    size (hollow markers, largest first), so a series equal to another stays visible around it."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    markers, dashes = "osD^v<>", ["-", "--", ":", "-."]
    for i, (name, ys) in enumerate(series.items()):
        ax.plot(x, ys, marker=markers[i % len(markers)], ls=dashes[i % len(dashes)], ms=max(3.0, 9.0 - 1.5 * i), fillstyle="none", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(images: list[Image.Image | torch.Tensor | np.ndarray], *, titles: list[str] | None = None, ncols: int = 4, title: str | None = None) -> Figure:
    """Images in a grid with optional titles."""
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.8 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(_as_array(images[i]))
            if titles:
                ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def training_curves(log: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Training loss (left axis) and validation PCK (right axis, where validated) against the step, from a
    `train.TrainResult.log` (columns step, loss, val_pck)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(log["step"], log["loss"], color="tab:blue", lw=1.2, label="training loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss", color="tab:blue")
    val = log.dropna(subset=["val_pck"])
    if len(val):
        ax2 = ax.twinx()
        ax2.plot(val["step"], val["val_pck"], color="tab:orange", marker="o", label="validation PCK@0.1")
        ax2.set_ylabel("validation PCK@0.1 (%)", color="tab:orange")
        ax2.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def loss_curves(losses: torch.Tensor, *, xlabel: str = "Adam step", ylabel: str = "loss", title: str | None = None) -> Figure:
    """steps x curves (e.g. steps x points): each curve faint, their mean bold."""
    curves = torch.as_tensor(losses).float().cpu().reshape(losses.shape[0], -1).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curves, color="tab:blue", alpha=0.3, lw=1)
    ax.plot(curves.mean(axis=1), color="black", lw=2, label=f"mean over {curves.shape[1]}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend()
    return fig


def map_pairs(
    src_image: torch.Tensor,
    trg_image: torch.Tensor,
    src_maps: torch.Tensor,
    trg_maps: torch.Tensor,
    src_xy: torch.Tensor,
    pred_xy: torch.Tensor,
    gt_xy: torch.Tensor,
    *,
    n: int = 3,
    title: str | None = None,
) -> Figure:
    """For the first `n` points: the source map over the source image with its point (top row), the target map
    over the target with the predicted point (o) and the true one (x) (bottom row). Maps: N x H x W, pixels of
    their image; points: N x 2 pixels."""
    n = min(n, len(src_xy))
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    rows = [(src_image, src_maps, src_xy, "source"), (trg_image, trg_maps, pred_xy, "target")]
    for i in range(n):
        for row, (image, maps, xy, name) in enumerate(rows):
            ax = axes[row, i]
            h, w = image.shape[-2:]
            ax.imshow(_as_array(image))
            shown = ax.imshow(torch.as_tensor(maps[i]).float().cpu().numpy(), cmap="jet", alpha=0.5, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.scatter(*xy[i].tolist(), c="white", edgecolors="black", s=50)
            if row == 1:
                ax.scatter(*gt_xy[i].tolist(), c="lime", marker="x", s=60)
            ax.set_title(f"point {i}: {name}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96 if title else 1))
    return fig


# ---- interactive and per-point views ----------------------------------------------------------------------
def correlation_panels(methods: dict[str, Any], pairs: Any, n_points: int, matcher: str) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """Notebook 07's figure: for each pair and method, the source with its first `n_points` points, then each
    point's similarity map over the target with its match (dot) and the truth (cross), titled "point j" with a
    check mark when the match lies within 0.1 x threshold. Returns the keyword arguments of
    `sdm.viz.heatmap_panels` (images, maps, points, crosses, titles; rows padded to 1 + n_points panels) and per
    method the points within 0.1 x threshold ("correct" of "points") and each point's peak similarity ("peak")."""
    from sdm.evaluate import pair_correlation
    from sdm.metrics import pck

    panels: dict[str, list[Any]] = {key: [] for key in ("images", "maps", "points", "crosses", "titles")}

    def add(image: Any, heat: Any, point: Any, cross: Any, title: str) -> None:
        for key, value in zip(panels, (image, heat, point, cross, title)):
            panels[key].append(value)

    stats = {name: {"correct": 0, "points": 0, "peak": []} for name in methods}
    for i in range(len(pairs)):
        pair = pairs[i]
        k = min(n_points, pair.n_kps)
        for name, extractor in methods.items():
            maps, pred = pair_correlation(extractor, pair, k, matcher)
            ok = pck(pred, pair.trg_kps[:k], pair.threshold, alpha=0.1)
            stats[name]["correct"] += int(ok.sum())
            stats[name]["points"] += k
            stats[name]["peak"] += maps.flatten(1).max(dim=1).values.tolist()
            add(pair.src_image, None, pair.src_kps[:k], None, f"{pair.category} source / {name}")
            for j in range(k):
                add(pair.trg_image, maps[j], pred[j], pair.trg_kps[j], f"point {j + 1}" + (" ✓" if ok[j] else ""))
            for _ in range(n_points - k):  # rows stay aligned when a pair has fewer points
                add(pair.trg_image, None, None, None, "")
    return panels, stats


def point_picker(
    pair: Any, src_f: torch.Tensor, trg_f: torch.Tensor, image_size: tuple[int, int], matcher: str, title: str = "",
    display_width: int = 320,
) -> Any:
    """Notebook 00's point picker: click a pixel of the pair's source image (or move the x, y sliders); each pick
    prints "picked (x, y) -> match (x', y')" and redraws the match in the target with its similarity map
    (`plot_correspondences`). Pixels are those of the resized images (`image_size` = (H, W)). src_f, trg_f:
    1 x C x h x w features of the pair's images. The source is shown `display_width` pixels wide; clicks are read
    in its own pixels (ipyevents' dataX, dataY). Returns the ipywidgets box; display it."""
    import ipywidgets as widgets
    from ipyevents import Event

    h, w = pair.src_image.shape[-2:]
    picture = widgets.Image(value=_png(pair.src_image), format="png", layout=widgets.Layout(width=f"{display_width}px"))
    x_pick = widgets.IntSlider(value=int(pair.src_kps[0, 0]), min=0, max=w - 1, description="x")
    y_pick = widgets.IntSlider(value=int(pair.src_kps[0, 1]), min=0, max=h - 1, description="y")
    picked = widgets.Output()
    held = [False]  # a click sets both sliders: draw once, after the second

    def update(_: Any = None) -> None:
        if not held[0]:
            _draw_pick(picked, pair, src_f, trg_f, image_size, matcher, (x_pick.value, y_pick.value), title)

    def on_click(event: dict[str, Any]) -> None:
        held[0] = True
        x_pick.value = min(max(int(event["dataX"]), 0), w - 1)
        y_pick.value = min(max(int(event["dataY"]), 0), h - 1)
        held[0] = False
        update()

    Event(source=picture, watched_events=["click"]).on_dom_event(on_click)
    x_pick.observe(update, names="value")
    y_pick.observe(update, names="value")
    update()
    hint = widgets.HTML("Click the source image (or move the sliders) to pick a point.")
    return widgets.VBox([hint, picture, widgets.HBox([x_pick, y_pick]), picked])


def _draw_pick(
    out: Any, pair: Any, src_f: torch.Tensor, trg_f: torch.Tensor, image_size: tuple[int, int], matcher: str,
    xy: tuple[int, int], title: str,
) -> None:
    from sdm.matching import correlation, match, sample_features, to_feature_coords, to_image_coords

    fsize = tuple(src_f.shape[-2:])
    q_px = torch.tensor([xy], dtype=torch.float32)
    q = to_feature_coords(q_px.to(src_f.device), image_size, fsize)[None]
    pred = to_image_coords(match(src_f, trg_f, q, matcher)[0].cpu(), fsize, image_size)
    heat = correlation(sample_features(src_f, q), trg_f)[0, 0].cpu()
    with out:
        out.clear_output(wait=True)
        print(f"picked ({xy[0]}, {xy[1]}) -> match ({pred[0, 0]:.1f}, {pred[0, 1]:.1f})")
        plot_correspondences(pair.src_image, pair.trg_image, q_px, pred, heatmap=heat, title=title)
        plt.show()


def _png(image: torch.Tensor) -> bytes:
    """3 x H x W in [0, 1] -> PNG bytes."""
    import io

    buffer = io.BytesIO()
    Image.fromarray((_as_array(image) * 255).round().clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = [
    "correlation_panels",
    "figure_path",
    "grouped_bar",
    "heatmap_panels",
    "image_grid",
    "line_plot",
    "loss_curves",
    "map_pairs",
    "parse_points",
    "pck_bar",
    "plot_correspondences",
    "point_picker",
    "save_figure",
    "table_heatmap",
    "training_curves",
]
