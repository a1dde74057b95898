"""PCK: the correctness test, the three datasets' thresholds, and per-image / per-point aggregation.

A prediction is correct when its distance to the ground truth is <= alpha * threshold, by default in the
resized (e.g. 768 x 768) image space with each dataset's standard threshold. Other papers use other
threshold modes and frames: `THRESHOLDS` names them all (docs/protocols.md). docs/specification.md, "PCK", is the
specification.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from sdm.config import Frame

ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.15)
CATEGORY_MEAN = "mean of categories"  # row of `pck_table`: the unweighted mean of the per-category rows


def pck(pred_xy: torch.Tensor, gt_xy: torch.Tensor, threshold: torch.Tensor | float, alpha: float = 0.1) -> torch.Tensor:
    """Per-point correctness.

    Args:
        pred_xy, gt_xy: ... x N x 2 pixel coordinates (x, y), same shape.
        threshold: scalar, or one value per row of points (shape ``pred_xy.shape[:-2]``).
        alpha: fraction of the threshold.
    Returns:
        bool tensor ... x N: distance <= alpha * threshold.
    """
    if pred_xy.shape != gt_xy.shape or pred_xy.shape[-1] != 2:
        raise ValueError(f"pred_xy and gt_xy must both be ... x N x 2; got {tuple(pred_xy.shape)} and {tuple(gt_xy.shape)}")
    dist = torch.linalg.vector_norm(pred_xy.float() - gt_xy.float(), dim=-1)
    thr = torch.as_tensor(threshold, dtype=dist.dtype, device=dist.device)
    if thr.dim() > 0:
        thr = thr.unsqueeze(-1)
    if torch.any(thr <= 0):
        raise ValueError("PCK thresholds must be positive")
    return dist <= alpha * thr


def spair_threshold(bbox_xyxy: torch.Tensor) -> torch.Tensor:
    """SPair-71k: max(height, width) of the target bounding box (x1, y1, x2, y2), ... x 4 -> ..."""
    wh = bbox_xyxy[..., 2:4] - bbox_xyxy[..., 0:2]
    return wh.max(dim=-1).values


def pfpascal_threshold(image_hw: torch.Tensor) -> torch.Tensor:
    """PF-Pascal: max(height, width) of the (target) image, ... x 2 -> ..."""
    return torch.as_tensor(image_hw).max(dim=-1).values


def pfwillow_threshold(kps_xy: torch.Tensor, n_valid: torch.Tensor | int | None = None) -> torch.Tensor:
    """PF-Willow: max(x extent, y extent) of the target keypoints, ... x K x 2 -> ...

    `n_valid` (per row) ignores padded points at the end of each row.
    """
    kps = kps_xy.float()
    if n_valid is not None:
        valid = torch.arange(kps.shape[-2], device=kps.device) < torch.as_tensor(n_valid, device=kps.device).unsqueeze(-1)
        big = torch.finfo(kps.dtype).max
        lo = torch.where(valid.unsqueeze(-1), kps, torch.full_like(kps, big)).amin(dim=-2)
        hi = torch.where(valid.unsqueeze(-1), kps, torch.full_like(kps, -big)).amax(dim=-2)
    else:
        lo, hi = kps.amin(dim=-2), kps.amax(dim=-2)
    return (hi - lo).max(dim=-1).values


def point_records(
    pred_xy: torch.Tensor,
    gt_xy: torch.Tensor,
    n_valid: torch.Tensor | Sequence[int],
    threshold: torch.Tensor | Sequence[float],
    categories: Sequence[str],
    pair_ids: Sequence[str],
) -> pd.DataFrame:
    """One row per real keypoint of a batch of pairs: pair_id, category, dist, threshold (dist / threshold
    is what PCK compares with alpha). Padded points (beyond `n_valid`) are dropped.

    pred_xy, gt_xy: B x K x 2 pixels; n_valid: B; threshold: B.
    """
    pred = pred_xy.detach().float().cpu()
    gt = gt_xy.detach().float().cpu()
    dist = torch.linalg.vector_norm(pred - gt, dim=-1).numpy()
    n_valid = [int(n) for n in torch.as_tensor(n_valid).cpu()]
    thr = torch.as_tensor(threshold, dtype=torch.float32).cpu().numpy()
    rows = []
    for b, n in enumerate(n_valid):
        if n <= 0:
            raise ValueError(f"pair {pair_ids[b]!r} has no keypoints")
        for k in range(n):
            rows.append((str(pair_ids[b]), str(categories[b]), k, float(dist[b, k]), float(thr[b])))
    return pd.DataFrame(rows, columns=["pair_id", "category", "point", "dist", "threshold"])


def pck_table(records: pd.DataFrame, alphas: Sequence[float] = ALPHAS) -> pd.DataFrame:
    """Per-category and overall PCK (in percent) from `point_records` rows.

    Returns a DataFrame indexed by category (sorted, then "all"), with columns
    ``per_image@<alpha>`` (mean over a pair's points, then over pairs: the paper's protocol) and
    ``per_point@<alpha>`` (all points pooled), plus ``n_pairs`` and ``n_points``.
    "all" is computed over all pairs; the row `CATEGORY_MEAN` is the mean of the per-category values (what
    papers that average over categories report).
    """
    if len(records) == 0:
        raise ValueError("no keypoint records to aggregate")
    df = records.copy()
    cols = []
    for a in alphas:
        df[f"ok@{a:g}"] = (df["dist"] <= a * df["threshold"]).astype(np.float64)
        cols.append(f"ok@{a:g}")
    per_pair = df.groupby(["category", "pair_id"], sort=True)[cols].mean().reset_index()

    def summarise(points: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, float]:
        out: dict[str, float] = {}
        for a, c in zip(alphas, cols):
            out[f"per_image@{a:g}"] = 100.0 * pairs[c].mean()
        for a, c in zip(alphas, cols):
            out[f"per_point@{a:g}"] = 100.0 * points[c].mean()
        out["n_pairs"] = len(pairs)
        out["n_points"] = len(points)
        return out

    table = {cat: summarise(df[df.category == cat], per_pair[per_pair.category == cat]) for cat in sorted(df.category.unique())}
    table["all"] = summarise(df, per_pair)
    cats = [table[c] for c in sorted(df.category.unique())]
    table[CATEGORY_MEAN] = {k: float(np.mean([c[k] for c in cats])) for k in table["all"] if k.startswith("per_")}
    table[CATEGORY_MEAN].update(n_pairs=table["all"]["n_pairs"], n_points=table["all"]["n_points"])
    result = pd.DataFrame.from_dict(table, orient="index")
    result.index.name = "category"
    result[["n_pairs", "n_points"]] = result[["n_pairs", "n_points"]].astype(int)
    return result


# ---- protocols: threshold modes and frames ----------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdRule:
    """One way of turning a pair into its PCK threshold (in pixels of the chosen frame)."""

    name: str
    description: str
    used_by: str
    compute: Callable[[PairFacts], float]


@dataclass
class PairFacts:
    """What the threshold rules look at, for one pair, in one frame (resized input or original image)."""

    src_kps: torch.Tensor  # K x 2
    trg_kps: torch.Tensor  # K x 2
    src_bbox: torch.Tensor | None  # (x1, y1, x2, y2)
    trg_bbox: torch.Tensor | None
    trg_hw: tuple[float, float]  # target image (H, W)
    trg_scale: tuple[float, float] = (1.0, 1.0)  # (x, y) factors from the stored target image to this frame


def _bbox_side(box: torch.Tensor | None, which: str) -> float:
    if box is None:
        raise ValueError(f"this dataset has no {which} bounding boxes: choose another threshold mode (see sdm.metrics.THRESHOLDS)")
    return float(spair_threshold(torch.as_tensor(box, dtype=torch.float32)))


def _bbox_xscale(f: PairFacts) -> float:
    # eval/cub2011.py:133-137 (called at :106) of ubc-vision/LDM_correspondences: max(w, h) of the stored box times the x factor
    if f.trg_bbox is None:
        raise ValueError("this dataset has no target bounding boxes: choose another threshold mode (see sdm.metrics.THRESHOLDS)")
    sx, sy = f.trg_scale
    w = float(f.trg_bbox[2] - f.trg_bbox[0]) / sx
    h = float(f.trg_bbox[3] - f.trg_bbox[1]) / sy
    return max(w, h) * sx


def _hedlin_padded_extent(f: PairFacts) -> float:
    # eval/pfwillow.py:52 and 60-69 of ubc-vision/LDM_correspondences: points padded to 40 with -1, then
    # max(max - min) over x and y including the padding, i.e. max(max_x, max_y) + 1 for non-negative points
    return float((f.trg_kps.max(dim=0).values + 1.0).max())


THRESHOLDS: dict[str, ThresholdRule] = {
    r.name: r
    for r in (
        ThresholdRule("trg-bbox", "max(h, w) of the target bounding box", "SPair-71k standard (SD4Match, DIFT)", lambda f: _bbox_side(f.trg_bbox, "target")),
        ThresholdRule(
            "src-bbox", "max(h, w) of the source bounding box", "DHPF, CATs; Hedlin et al.'s SPair-71k code (eval/dataset.py:188-200)",
            lambda f: _bbox_side(f.src_bbox, "source"),
        ),
        ThresholdRule(
            "trg-bbox-xscale", "max(w, h) of the stored target box, both sides scaled by the x resize factor",
            "Hedlin et al.'s CUB-200 code (eval/cub2011.py:133-137, called at :106); equals trg-bbox in the original frame", _bbox_xscale,
        ),
        ThresholdRule("image", "max(H, W) of the target image", "PF-Pascal standard; an option for SPair-71k", lambda f: float(max(f.trg_hw))),
        ThresholdRule("kps-extent", "max(x extent, y extent) of the target keypoints", "PF-Willow standard", lambda f: float(pfwillow_threshold(f.trg_kps))),
        ThresholdRule(
            "kps-extent-hedlin", "the extent over the keypoints padded with -1 to 40 points: max(max x, max y) + 1",
            "Hedlin et al.'s PF-Willow code (a bug that inflates the threshold; only to reproduce their numbers)", _hedlin_padded_extent,
        ),
    )
}


# Hedlin et al.'s benchmarks: dataset -> (the standard threshold mode, the one their code uses): PF-Willow's
# padded extent (eval/pfwillow.py:49-70), SPair-71k's source box (eval/dataset.py:188-200), CUB's x-scaled box
# (eval/cub2011.py:133-137).
HEDLIN_PROTOCOL: dict[str, tuple[str, str]] = {
    "pfwillow": ("kps-extent", "kps-extent-hedlin"),
    "spair": ("trg-bbox", "src-bbox"),
    "cub": ("trg-bbox", "trg-bbox-xscale"),
}


def frame_scale(size_wh: tuple[int, int], image_size: tuple[int, int], frame: Frame) -> torch.Tensor:
    """Per-axis factors (x, y) from resized-input pixels to the frame's pixels."""
    if frame == "resized":
        return torch.ones(2)
    if frame == "original":
        return torch.tensor([size_wh[0] / image_size[1], size_wh[1] / image_size[0]], dtype=torch.float32)
    raise ValueError(f"unknown frame {frame!r}; choose 'resized' (the network input, SD4Match) or 'original' (the stored image)")


def pair_facts(
    src_kps: torch.Tensor,
    trg_kps: torch.Tensor,
    extra: dict[str, Any],
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    image_size: tuple[int, int],
    frame: Frame,
) -> PairFacts:
    """One pair's keypoints (resized-input pixels), boxes and sizes expressed in `frame`."""
    fs, ft = frame_scale(src_size, image_size, frame), frame_scale(trg_size, image_size, frame)
    box = lambda b, f: None if b is None else torch.as_tensor(b, dtype=torch.float32) * f.repeat(2)  # noqa: E731
    hw = (float(image_size[0]), float(image_size[1])) if frame == "resized" else (float(trg_size[1]), float(trg_size[0]))
    scale = (hw[1] / trg_size[0], hw[0] / trg_size[1])
    return PairFacts(src_kps.float() * fs, trg_kps.float() * ft, box(extra.get("src_bbox"), fs), box(extra.get("trg_bbox"), ft), hw, scale)


def threshold_of(facts: PairFacts, mode: str) -> float:
    """The PCK threshold of one pair under a mode of `THRESHOLDS`."""
    if mode not in THRESHOLDS:
        raise ValueError(f"unknown threshold mode {mode!r}; choose one of {', '.join(THRESHOLDS)}")
    value = THRESHOLDS[mode].compute(facts)
    if not value > 0:
        raise ValueError(f"threshold mode {mode!r} gives {value} for a pair; PCK thresholds must be positive")
    return value


__all__ = [
    "ALPHAS",
    "CATEGORY_MEAN",
    "HEDLIN_PROTOCOL",
    "THRESHOLDS",
    "Frame",
    "frame_scale",
    "pair_facts",
    "pck",
    "pck_table",
    "pfpascal_threshold",
    "pfwillow_threshold",
    "point_records",
    "spair_threshold",
    "threshold_of",
]
