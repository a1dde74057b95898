"""Coordinates, feature sampling, correlation and the three matchers.

Keypoints are (x, y). Image <-> feature-map scaling is "align corners": pixel 0 is cell 0 and pixel
W-1 is cell w-1. All matchers take and return keypoints as B x N x 2 in feature-cell coordinates
(floats in [0, w-1] x [0, h-1]); convert with `to_feature_coords` / `to_image_coords`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from sdm.config import (
    MATCHERS,
    SIMILARITIES,
    SOFT_EVAL_WINDOW,
    MatchConfig,
    Matcher,
    Similarity,
    enrol,
    matcher_temperature,
)

if TYPE_CHECKING:
    from sdm.features import ImageInput, PromptInput, SDFeaturizer


def _hw(size: tuple[int, int] | int) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def to_feature_coords(xy: torch.Tensor, image_size: tuple[int, int] | int, feature_size: tuple[int, int] | int) -> torch.Tensor:
    """Pixel (x, y) -> feature-cell (x, y): x_f = x * (w - 1) / (W - 1). Sizes are (H, W) / (h, w)."""
    (h_img, w_img), (h, w) = _hw(image_size), _hw(feature_size)
    # python scales, not a new tensor: no host-to-device copy, so a CUDA graph can capture it (sdm.step_graph)
    return torch.stack([xy[..., 0] * ((w - 1) / (w_img - 1)), xy[..., 1] * ((h - 1) / (h_img - 1))], dim=-1)


def to_image_coords(xy: torch.Tensor, feature_size: tuple[int, int] | int, image_size: tuple[int, int] | int) -> torch.Tensor:
    """Feature-cell (x, y) -> pixel (x, y), the inverse of `to_feature_coords`. Sizes are (h, w) / (H, W)."""
    (h, w), (h_img, w_img) = _hw(feature_size), _hw(image_size)
    # python scales: a new tensor would be a blocking host-to-device copy, which waits for the whole batch's GPU
    # work before the evaluation loop can queue the next batch (sdm.evaluate reads a batch back one batch late)
    return torch.stack([xy[..., 0] * ((w_img - 1) / (w - 1)), xy[..., 1] * ((h_img - 1) / (h - 1))], dim=-1)


def _check_feats(name: str, feats: torch.Tensor) -> None:
    if feats.dim() != 4:
        raise ValueError(f"{name} must be B x C x h x w; got shape {tuple(feats.shape)}")
    if min(feats.shape[-2:]) < 2:
        raise ValueError(f"{name} needs at least 2 x 2 cells for align-corners coordinates; got {tuple(feats.shape[-2:])}")


def _check_points(xy: torch.Tensor, feats: torch.Tensor, name: str = "query_xy") -> None:
    if xy.dim() != 3 or xy.shape[-1] != 2 or xy.shape[0] != feats.shape[0]:
        raise ValueError(f"{name} must be B x N x 2 with B = {feats.shape[0]}; got shape {tuple(xy.shape)}")
    if xy.shape[1] == 0:
        raise ValueError(f"{name} holds no keypoints (N = 0)")


def _normalise_coords(xy: torch.Tensor, feature_size: tuple[int, int]) -> torch.Tensor:
    """Feature-cell (x, y) -> grid_sample's [-1, 1] coordinates (align_corners=True)."""
    h, w = feature_size
    return torch.stack([2 * xy[..., 0] / (w - 1) - 1, 2 * xy[..., 1] / (h - 1) - 1], dim=-1)


def sample_features(feats: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear features at sub-cell positions (align corners, border padding).

    feats: B x C x h x w; xy: B x N x 2 feature-cell coordinates -> B x N x C.
    """
    _check_feats("feats", feats)
    _check_points(xy, feats, "xy")
    grid = _normalise_coords(xy.to(feats.dtype), feats.shape[-2:]).unsqueeze(2)  # B x N x 1 x 2
    out = F.grid_sample(feats, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.squeeze(-1).transpose(1, 2)


def correlation(query: torch.Tensor, trg_feats: torch.Tensor, similarity: Similarity = "cosine") -> torch.Tensor:
    """Similarity of query vectors with every target cell: B x N x C, B x C x h x w -> B x N x h x w.
    "cosine" (in [-1, 1]) or "dot" (the raw inner product)."""
    _check_feats("trg_feats", trg_feats)
    if query.dim() != 3 or query.shape[0] != trg_feats.shape[0] or query.shape[-1] != trg_feats.shape[1]:
        raise ValueError(
            f"query must be B x N x C matching trg_feats {tuple(trg_feats.shape)}; got {tuple(query.shape)}"
        )
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
    b, _, h, w = trg_feats.shape
    q, t = query.float(), trg_feats.float().flatten(2)
    if similarity == "cosine":
        q, t = F.normalize(q, dim=-1), F.normalize(t, dim=1)
    return torch.bmm(q, t).view(b, -1, h, w)


def _cell_grid(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(x, y) of every cell, h x w x 2, float."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1).float()


def argmax_2d(scores: torch.Tensor) -> torch.Tensor:
    """Position of the maximum of each map: ... x h x w -> ... x 2 as (x, y) cells (first maximum on ties)."""
    w = scores.shape[-1]
    idx = scores.flatten(-2).argmax(dim=-1)
    return torch.stack([idx % w, idx // w], dim=-1).float()


def soft_argmax_2d(scores: torch.Tensor, temperature: float = 0.04) -> torch.Tensor:
    """Expected (x, y) cell under softmax(scores / temperature): ... x h x w -> ... x 2."""
    h, w = scores.shape[-2:]
    prob = torch.softmax(scores.flatten(-2).float() / temperature, dim=-1)
    grid = _cell_grid(h, w, scores.device).view(-1, 2)
    return prob @ grid


def kernel_soft_argmax_2d(scores: torch.Tensor, temperature: float = 0.04, sigma: float = 7.0) -> torch.Tensor:
    """Kernel-Softmax (Lee et al., SFNet): scores times exp(-d^2 / (2 sigma^2)), d the distance in cells to
    the argmax (so the kernel peaks at 1 there), then `soft_argmax_2d`. ... x h x w -> ... x 2."""
    h, w = scores.shape[-2:]
    peak = argmax_2d(scores)  # ... x 2
    grid = _cell_grid(h, w, scores.device)  # h x w x 2
    d2 = ((grid - peak[..., None, None, :]) ** 2).sum(-1)
    kernel = torch.exp(-d2 / (2 * sigma**2))
    return soft_argmax_2d(scores.float() * kernel, temperature)


def window_soft_argmax_2d(scores: torch.Tensor, temperature: float = 0.02, window: int = SOFT_EVAL_WINDOW) -> torch.Tensor:
    """GeoAware-SC's window soft-argmax (`get_flow` with SOFT_EVAL_WINDOW, utils/utils_correspondence.py:297-337 of
    Junyi42/GeoAware-SC 99fd6b6): the scores outside the (2 window + 1)^2 cells around the argmax (the window cut
    at the border) are multiplied by 0, not removed: they stay in the softmax with score 0. Then the expected cell
    under softmax(scores / temperature) (their `soft_argmax`, :234-256, at beta 0.02). ... x h x w -> ... x 2."""
    h, w = scores.shape[-2:]
    peak = argmax_2d(scores)  # ... x 2
    offsets = _cell_grid(h, w, scores.device) - peak[..., None, None, :]  # ... x h x w x 2
    inside = (offsets.abs() <= window).all(dim=-1)
    return soft_argmax_2d(scores * inside, temperature)


def _scores(
    src_feats: torch.Tensor, trg_feats: torch.Tensor, query_xy: torch.Tensor, similarity: Similarity = "cosine"
) -> torch.Tensor:
    _check_feats("src_feats", src_feats)
    if src_feats.shape[:2] != trg_feats.shape[:2]:
        raise ValueError(f"src_feats {tuple(src_feats.shape)} and trg_feats {tuple(trg_feats.shape)} differ in B or C")
    return correlation(sample_features(src_feats, query_xy), trg_feats, similarity)


def nearest_neighbour(
    src_feats: torch.Tensor, trg_feats: torch.Tensor, query_xy: torch.Tensor, *, similarity: Similarity = "cosine"
) -> torch.Tensor:
    """Target cell of highest similarity (cosine by default) to each query's (bilinear) source feature.

    src_feats, trg_feats: B x C x h x w (target may differ in h, w); query_xy: B x N x 2 source cells.
    Returns B x N x 2 target cells (integers as floats).
    """
    return argmax_2d(_scores(src_feats, trg_feats, query_xy, similarity))


def soft_argmax(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    query_xy: torch.Tensor,
    *,
    temperature: float = 0.04,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """Expected target cell under softmax(similarity / temperature). Shapes as `nearest_neighbour`."""
    return soft_argmax_2d(_scores(src_feats, trg_feats, query_xy, similarity), temperature)


def kernel_soft_argmax(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    query_xy: torch.Tensor,
    *,
    temperature: float = 0.04,
    sigma: float = 7.0,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """Kernel-Softmax matching (docs/specification.md): the inference matcher of SD4Match. Shapes as `nearest_neighbour`."""
    return kernel_soft_argmax_2d(_scores(src_feats, trg_feats, query_xy, similarity), temperature, sigma)


def window_soft_argmax(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    query_xy: torch.Tensor,
    *,
    temperature: float = 0.02,
    window: int = SOFT_EVAL_WINDOW,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """GeoAware-SC's window soft-argmax (`window_soft_argmax_2d`). Shapes as `nearest_neighbour`."""
    return window_soft_argmax_2d(_scores(src_feats, trg_feats, query_xy, similarity), temperature, window)


def _nearest(src: torch.Tensor, trg: torch.Tensor, query: torch.Tensor, *, temperature: float, sigma: float, similarity: Similarity) -> torch.Tensor:
    return nearest_neighbour(src, trg, query, similarity=similarity)


def _soft(src: torch.Tensor, trg: torch.Tensor, query: torch.Tensor, *, temperature: float, sigma: float, similarity: Similarity) -> torch.Tensor:
    return soft_argmax(src, trg, query, temperature=temperature, similarity=similarity)


def _kernel(src: torch.Tensor, trg: torch.Tensor, query: torch.Tensor, *, temperature: float, sigma: float, similarity: Similarity) -> torch.Tensor:
    return kernel_soft_argmax(src, trg, query, temperature=temperature, sigma=sigma, similarity=similarity)


def _window(src: torch.Tensor, trg: torch.Tensor, query: torch.Tensor, *, temperature: float, sigma: float, similarity: Similarity) -> torch.Tensor:
    return window_soft_argmax(src, trg, query, temperature=temperature, similarity=similarity)


MatcherFunction = Callable[..., torch.Tensor]
# The registry: name -> f(src_feats, trg_feats, query_xy, *, temperature, sigma, similarity) -> B x N x 2 cells.
MATCHER_FUNCTIONS: dict[str, MatcherFunction] = {
    "nearest": _nearest, "soft_argmax": _soft, "kernel_soft_argmax": _kernel, "window_soft_argmax": _window,
}  # fmt: skip


def register_matcher(name: str, function: MatcherFunction) -> None:
    """Adds a matcher: `function(src_feats, trg_feats, query_xy, *, temperature, sigma, similarity)` returns
    B x N x 2 feature cells (shapes as `nearest_neighbour`). `MatchConfig(name)`, `evaluate(..., matcher=name)`
    and the command line's `--matcher` then take it."""
    enrol(MATCHER_FUNCTIONS, name, function, MATCHERS)


def match(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    query_xy: torch.Tensor,
    matcher: Matcher | MatchConfig | str = "kernel_soft_argmax",
    *,
    temperature: float | None = None,
    sigma: float = 7.0,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """The matcher of `MATCHER_FUNCTIONS` named `matcher`, or given by a `MatchConfig` (whose temperature, sigma
    and similarity then apply; a similarity None is cosine). A temperature None is the matcher's own
    (`sdm.config.matcher_temperature`). Shapes as `nearest_neighbour`."""
    if isinstance(matcher, MatchConfig):
        matcher, temperature, sigma, similarity = matcher.matcher, matcher.temperature, matcher.sigma, matcher.similarity or "cosine"
    temperature = matcher_temperature(str(matcher)) if temperature is None else temperature
    if matcher not in MATCHER_FUNCTIONS:
        raise ValueError(f"unknown matcher {matcher!r}; choose one of {MATCHERS}")
    return MATCHER_FUNCTIONS[matcher](src_feats, trg_feats, query_xy, temperature=temperature, sigma=sigma, similarity=similarity)


def match_points(
    featurizer: SDFeaturizer,
    src_image: ImageInput,
    trg_image: ImageInput,
    points_xy: torch.Tensor,
    prompt: PromptInput = "",
    matcher: Matcher = "kernel_soft_argmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matches pixel points of one source image into one target image.

    Args:
        featurizer: computes the feature maps (both images in one batch).
        src_image, trg_image: a PIL image, or a 3 x H x W tensor in [0, 1]. They may differ in size.
        points_xy: N x 2 pixel (x, y) in the source image's own (original) size.
        prompt: any prompt form `SDFeaturizer` accepts, shared by both images.
    Returns:
        (N x 2 matched pixel (x, y) in the target image's original size, h x w cosine map of the first point
        over the target features).
    """
    from sdm.features import to_pixel_tensor

    def size_of(im: ImageInput) -> tuple[int, int]:
        return (im.height, im.width) if isinstance(im, Image.Image) else tuple(im.shape[-2:])  # type: ignore[return-value]

    pts = torch.as_tensor(points_xy, dtype=torch.float32).reshape(-1, 2)
    src_hw, trg_hw = size_of(src_image), size_of(trg_image)
    if pts.shape[0] == 0:
        raise ValueError("no points to match")
    outside = (pts[:, 0] < 0) | (pts[:, 0] > src_hw[1] - 1) | (pts[:, 1] < 0) | (pts[:, 1] > src_hw[0] - 1)
    if outside.any():
        bad = pts[outside][0].tolist()
        raise ValueError(f"point {bad} lies outside the source image of size W x H = {src_hw[1]} x {src_hw[0]}")
    size = featurizer.image_size
    images = torch.cat([to_pixel_tensor(im, size, torch.device("cpu"), torch.float32) for im in (src_image, trg_image)])
    with torch.no_grad():
        feats = featurizer((images + 1) / 2, prompt)
    src, trg = feats[:1], feats[1:]
    fsize = tuple(feats.shape[-2:])
    # Per axis, as the datasets do: original pixels x (resized / original size) -> resized pixels -> cells.
    scale_src = pts.new_tensor([size[1] / src_hw[1], size[0] / src_hw[0]])
    query = to_feature_coords(pts * scale_src, size, fsize).unsqueeze(0).to(feats.device)
    cells = match(src, trg, query, matcher)[0].cpu()
    scale_trg = pts.new_tensor([trg_hw[1] / size[1], trg_hw[0] / size[0]])
    heat = _scores(src, trg, query[:, :1])[0, 0].cpu()
    return to_image_coords(cells, fsize, size) * scale_trg, heat


__all__ = [
    "MATCHERS",
    "MATCHER_FUNCTIONS",
    "SIMILARITIES",
    "SOFT_EVAL_WINDOW",
    "MatchConfig",
    "Matcher",
    "Similarity",
    "argmax_2d",
    "correlation",
    "kernel_soft_argmax",
    "kernel_soft_argmax_2d",
    "match",
    "match_points",
    "nearest_neighbour",
    "register_matcher",
    "sample_features",
    "soft_argmax",
    "soft_argmax_2d",
    "to_feature_coords",
    "to_image_coords",
    "window_soft_argmax",
    "window_soft_argmax_2d",
]
