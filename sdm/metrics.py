"""PCK: the correctness test, the three datasets' thresholds, and per-image / per-point aggregation.

A prediction is correct when its distance to the ground truth is <= alpha * threshold, all in the
resized (e.g. 768 x 768) image space. DESIGN.md, "PCK", is the specification.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.15)


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
    "all" is computed over all pairs (not the mean of the categories).
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
    result = pd.DataFrame.from_dict(table, orient="index")
    result.index.name = "category"
    result[["n_pairs", "n_points"]] = result[["n_pairs", "n_points"]].astype(int)
    return result
