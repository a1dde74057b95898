"""Gaussian-smoothed cross-entropy of SD4Match (SFNet / SimSC style); docs/specification.md, "Loss"."""

from __future__ import annotations

import math

import torch

from sdm.matching import correlation, sample_features


def gaussian_window(kernel_size: int = 7, sigma: float = 1.5, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets (k*k x 2, (dx, dy)) and Gaussian pdf weights (k*k) of the smoothing window, not renormalised."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive; got {kernel_size}")
    r = kernel_size // 2
    d = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    offsets = torch.stack([dx.flatten(), dy.flatten()], dim=-1)
    weights = torch.exp(-(offsets**2).sum(-1) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    return offsets, weights


def _bilinear_read(prob: torch.Tensor, pts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear values of flattened maps B x K x (h*w) at points B x K x M x 2 (align corners, border clamp).

    Indexing the four neighbours directly keeps integer positions exact; grid_sample's round trip through
    [-1, 1] shifts them by ~1e-7 cells, which matters where P jumps by orders of magnitude between cells.
    """
    x = pts[..., 0].clamp(0, w - 1)
    y = pts[..., 1].clamp(0, h - 1)
    x0 = x.floor().clamp(max=w - 2).long()
    y0 = y.floor().clamp(max=h - 2).long()
    ax, ay = x - x0, y - y0

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return torch.gather(prob, 2, (yy * w + xx).flatten(2)).view_as(ax)

    top = at(y0, x0) * (1 - ax) + at(y0, x0 + 1) * ax
    bottom = at(y0 + 1, x0) * (1 - ax) + at(y0 + 1, x0 + 1) * ax
    return top * (1 - ay) + bottom * ay


def gaussian_cross_entropy(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_xy: torch.Tensor,
    trg_xy: torch.Tensor,
    n_valid: torch.Tensor,
    *,
    temperature: float = 0.04,
    kernel_size: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Mean over pairs of the Gaussian-smoothed cross-entropy between matching probabilities and ground truth.

    For each real source keypoint: its bilinear source feature, cosine correlation with every target cell,
    softmax(. / temperature) = P over target cells; at the k x k points g + (dx, dy) around the ground truth
    g, P is read bilinearly (align corners, border padding) and -log P weighted by the Gaussian pdf
    (sigma cells). Window points outside the open range 0 < x < w-1, 0 < y < h-1 are left out. A pair's loss
    is the weighted sum over its windows divided by its number of keypoints.

    Args:
        src_feats, trg_feats: B x C x h x w features (the target may have another h, w).
        src_xy, trg_xy: B x K x 2 keypoints in feature-cell coordinates; rows padded after `n_valid`.
        n_valid: B counts of real keypoints (each >= 1; checked when given on the CPU).
    Returns:
        scalar loss (float32), differentiable in both feature maps.
    """
    if src_xy.shape != trg_xy.shape:
        raise ValueError(f"src_xy {tuple(src_xy.shape)} and trg_xy {tuple(trg_xy.shape)} must have the same shape")
    b, k = src_xy.shape[:2]
    n_valid = torch.as_tensor(n_valid)
    if n_valid.shape != (b,):
        raise ValueError(f"n_valid must hold one count per pair (shape ({b},)); got {tuple(n_valid.shape)}")
    # counts on the GPU are not checked: reading them would wait for the GPU at every training step
    if n_valid.device.type == "cpu" and (torch.any(n_valid < 1) or torch.any(n_valid > k)):
        raise ValueError(f"n_valid must be in 1..{k} (every pair needs a keypoint); got {n_valid.tolist()}")
    n_valid = n_valid.to(src_xy.device).long()
    h, w = trg_feats.shape[-2:]
    prob = torch.softmax(correlation(sample_features(src_feats, src_xy), trg_feats).flatten(2) / temperature, dim=-1)

    offsets, weights = gaussian_window(kernel_size, sigma, src_xy.device)
    pts = trg_xy.float().unsqueeze(2) + offsets  # B x K x k*k x 2
    inside = (pts[..., 0] > 0) & (pts[..., 0] < w - 1) & (pts[..., 1] > 0) & (pts[..., 1] < h - 1)
    read = _bilinear_read(prob.view(b, k, h * w), pts, h, w)
    real = (torch.arange(k, device=src_xy.device) < n_valid[:, None]).unsqueeze(-1)
    mask = (inside & real).float()
    # The clamp only guards float underflow (P < 1e-30 is already a hopeless match); it never binds otherwise.
    nll = -(weights * mask * torch.log(read.clamp_min(1e-30))).sum(dim=(1, 2))
    return (nll / n_valid.float()).mean()


__all__ = [
    "gaussian_cross_entropy",
    "gaussian_window",
]
