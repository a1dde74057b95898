"""Synthetic pairs with exact correspondences, from photographs bundled with scikit-image (no download).

Pair i is generated from its own random stream (seeded by (seed, i)), so the dataset is random-access and
deterministic: the same seed gives identical pairs. Both images are random homographic views of one
photograph (the source a mild one, the target a stronger one: rotation, scale, translation, perspective),
each with its own photometric jitter (per-channel gain, contrast, brightness). Keypoints are drawn in the
photograph where the image is textured and near the centre ("foreground-ish": smoothed gradient magnitude
times a centred Gaussian), then mapped into both views; draws landing outside either image are rejected.

Threshold: the PF-Willow rule, max(x extent, y extent) of the target points, so PCK is as strict as on the
real benchmarks; a pair whose target points span less than a quarter of the image is redrawn.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import skimage.color
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from .base import ImageSize, Pair, PairDataset, as_hw, pil_to_tensor
from .errors import check_category

# Photographs shipped inside the scikit-image wheel (no pooch download): name -> H x W x 3 uint8.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "camera": lambda: skimage.color.gray2rgb(skimage.data.camera()),
    "cat": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "rocket": skimage.data.rocket,
}


@dataclass(frozen=True)
class WarpStrength:
    """Ranges of a random homography: rotation (degrees), log-uniform scale, translation and per-corner
    perspective offsets (fractions of the image side)."""

    rotation: float
    scale: tuple[float, float]
    translation: float
    perspective: float


_SOURCE_WARP = WarpStrength(rotation=10.0, scale=(0.95, 1.15), translation=0.04, perspective=0.03)
_TARGET_WARP = WarpStrength(rotation=30.0, scale=(0.75, 1.25), translation=0.1, perspective=0.1)
_MAX_TRIES = 50


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3 x 3 homography (h33 = 1) mapping four points src (4 x 2) onto dst (4 x 2)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * k], b[2 * k + 1] = u, v
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def apply_homography(h: np.ndarray | torch.Tensor, xy: np.ndarray | torch.Tensor) -> np.ndarray:
    """Map K x 2 points (x, y) through a 3 x 3 homography; returns K x 2 float64."""
    h = np.asarray(h, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64)
    p = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ h.T
    return p[:, :2] / p[:, 2:3]


def _random_homography(
    rng: np.random.Generator, size_hw: tuple[int, int], strength: WarpStrength
) -> np.ndarray:
    """A random homography of the image plane (pixel coordinates), built by moving the four corners."""
    h, w = size_hw
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)
    centre = corners.mean(axis=0)
    angle = math.radians(rng.uniform(-strength.rotation, strength.rotation))
    scale = math.exp(rng.uniform(math.log(strength.scale[0]), math.log(strength.scale[1])))
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    side = np.array([w, h], dtype=np.float64)
    shift = rng.uniform(-strength.translation, strength.translation, size=2) * side
    offsets = rng.uniform(-strength.perspective, strength.perspective, size=(4, 2)) * side
    moved = (corners - centre) @ rot.T + centre + shift + offsets
    return homography_from_points(corners, moved)


@functools.lru_cache(maxsize=8)
def _pixel_grid(size_hw: tuple[int, int]) -> torch.Tensor:
    """H x W x 3 homogeneous pixel coordinates (x, y, 1)."""
    h, w = size_hw
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)


def warp_image(image: torch.Tensor, h: np.ndarray) -> torch.Tensor:
    """Warp 3 x H x W by homography h (source pixel -> output pixel); outside the source is black.

    Output pixel (x, y) samples the source bilinearly at h^-1 (x, y) with align-corners pixel coordinates,
    so a point p of the source moves exactly to h(p)."""
    _, hh, ww = image.shape
    # fold the pixel -> [-1, 1] normalisation (align corners) into the inverse homography
    to_unit = np.array([[2 / (ww - 1), 0, -1], [0, 2 / (hh - 1), -1], [0, 0, 1]])
    m = torch.from_numpy(to_unit @ np.linalg.inv(h)).float()
    pts = _pixel_grid((hh, ww)) @ m.T
    grid = pts[..., :2] / pts[..., 2:3]
    return F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[
        0
    ]


def _photometric_jitter(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per-channel gain in [0.9, 1.1], contrast in [0.8, 1.2] about the mean, brightness +-0.08; clamped to [0, 1]."""
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, size=(3, 1, 1))).float()
    contrast = float(rng.uniform(0.8, 1.2))
    brightness = float(rng.uniform(-0.08, 0.08))
    out = image * gain
    mean = out.mean()
    return ((out - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=32)
def _photo(name: str, size_hw: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """The photograph resized to size_hw (3 x H x W in [0, 1]) and the cumulative keypoint-sampling weights
    over its H * W pixels."""
    image = pil_to_tensor(Image.fromarray(np.ascontiguousarray(PHOTOS[name]())), size_hw)
    gray = image.mean(dim=0).numpy().astype(np.float64)
    side = min(size_hw)
    texture = scipy.ndimage.gaussian_filter(
        scipy.ndimage.gaussian_gradient_magnitude(gray, side / 128), side / 32
    )
    h, w = size_hw
    ys, xs = np.mgrid[0:h, 0:w]
    centre = np.exp(-(((xs - (w - 1) / 2) / (0.3 * w)) ** 2 + ((ys - (h - 1) / 2) / (0.3 * h)) ** 2) / 2)
    weights = (texture + 1e-3 * texture.mean()) * centre
    cdf = np.cumsum(weights.ravel())
    return image, cdf / cdf[-1]


def _inside(xy: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    h, w = size_hw
    return (
        np.isfinite(xy).all(axis=1)
        & (xy[:, 0] >= 0)
        & (xy[:, 0] <= w - 1)
        & (xy[:, 1] >= 0)
        & (xy[:, 1] <= h - 1)
    )


class SyntheticPairs(PairDataset):
    """``n`` synthetic pairs at ``image_size`` with ``n_kps`` exact correspondences each.

    Pair i uses photograph ``photos[i % len(photos)]`` (its name is the category). Ids: src_id
    "synthetic:<seed>:<i>:src", trg_id "...:trg", pair_id "synthetic:<seed>:<i>"; src_size = trg_size =
    (W, H) of ``image_size``. ``extra``: homography (3 x 3 float64 tensor mapping source pixels (x, y, 1)
    to target pixels), photo (name). ``photometric=False`` turns the jitter off.
    """

    threshold_mode = "kps-extent"  # the standard PCK threshold (sdm.metrics.THRESHOLDS)

    def __init__(
        self,
        n: int = 64,
        image_size: ImageSize = 256,
        seed: int = 0,
        n_kps: int = 10,
        photos: Sequence[str] | None = None,
        photometric: bool = True,
    ) -> None:
        if n < 0 or n_kps < 2:
            raise ValueError(f"need n >= 0 and n_kps >= 2, got n={n}, n_kps={n_kps}")
        names = sorted(PHOTOS)
        for name in photos or ():
            check_category(name, names)
        self.photos = list(photos) if photos else names
        self.n = n
        self.image_size = as_hw(image_size)
        self.seed = seed
        self.n_kps = n_kps
        self.photometric = photometric
        self.categories = sorted({self.photos[i % len(self.photos)] for i in range(n)})

    def __len__(self) -> int:
        return self.n

    def _sample(self, rng: np.random.Generator, cdf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw (H_src, H_trg, photo points K x 2) so that all points land inside both views."""
        size = self.image_size
        h, w = size
        for _ in range(_MAX_TRIES):
            h_src = _random_homography(rng, size, _SOURCE_WARP)
            h_trg = _random_homography(rng, size, _TARGET_WARP)
            flat = np.searchsorted(cdf, rng.uniform(size=8 * self.n_kps), side="right").clip(0, h * w - 1)
            # sub-pixel offsets so that points are not all on the pixel grid
            pts = np.stack([flat % w, flat // w], axis=1) + rng.uniform(-0.5, 0.5, size=(len(flat), 2))
            pts = np.clip(pts, 0, [w - 1, h - 1])
            ok = _inside(apply_homography(h_src, pts), size) & _inside(apply_homography(h_trg, pts), size)
            pts = pts[ok][: self.n_kps]
            if len(pts) < self.n_kps:
                continue
            trg = apply_homography(h_trg, pts)
            if np.ptp(trg, axis=0).max() >= 0.25 * min(h, w):
                return h_src, h_trg, pts
        raise RuntimeError(f"could not draw {self.n_kps} keypoints inside both views in {_MAX_TRIES} tries")

    def __getitem__(self, i: int) -> Pair:
        return self._pair(i, self.decode_images)

    def _pair(self, i: int, images: bool) -> Pair:
        """Pair i; without `images` it carries empty 3 x 0 x 0 ones (`decode_images` off), its keypoints unchanged:
        they are drawn before the jitter."""
        if not 0 <= i < self.n:
            raise IndexError(f"pair index {i} out of range 0..{self.n - 1}")
        name = self.photos[i % len(self.photos)]
        rng = np.random.default_rng([self.seed, i])
        photo, cdf = _photo(name, self.image_size)
        h_src, h_trg, pts = self._sample(rng, cdf)
        if images:
            src_image, trg_image = warp_image(photo, h_src), warp_image(photo, h_trg)
            if self.photometric:
                src_image, trg_image = _photometric_jitter(src_image, rng), _photometric_jitter(trg_image, rng)
        else:
            src_image, trg_image = torch.zeros(3, 0, 0), torch.zeros(3, 0, 0)
        src_kps = torch.from_numpy(apply_homography(h_src, pts)).float()
        trg_kps = torch.from_numpy(apply_homography(h_trg, pts)).float()
        src_to_trg = h_trg @ np.linalg.inv(h_src)
        wh = (self.image_size[1], self.image_size[0])
        prefix = f"synthetic:{self.seed}:{i}"
        return Pair(
            src_image=src_image,
            trg_image=trg_image,
            src_kps=src_kps,
            trg_kps=trg_kps,
            n_kps=self.n_kps,
            category=name,
            threshold=self.pair_threshold((src_kps, trg_kps), (wh, wh), {}),
            src_id=f"{prefix}:src",
            trg_id=f"{prefix}:trg",
            src_size=wh,
            trg_size=wh,
            pair_id=prefix,
            extra={"homography": torch.from_numpy(src_to_trg / src_to_trg[2, 2]), "photo": name},
        )

    def image_ids(self) -> list[str]:
        return [f"synthetic:{self.seed}:{i}:{side}" for i in range(self.n) for side in ("src", "trg")]

    def load_image(self, image_id: str) -> torch.Tensor:
        _, seed, i, side = image_id.split(":")
        if int(seed) != self.seed or side not in ("src", "trg"):
            raise KeyError(f"image id {image_id!r} is not from this dataset (seed {self.seed})")
        pair = self._pair(int(i), images=True)
        return pair.src_image if side == "src" else pair.trg_image


__all__ = [
    "PHOTOS",
    "SyntheticPairs",
    "apply_homography",
    "homography_from_points",
    "warp_image",
]
