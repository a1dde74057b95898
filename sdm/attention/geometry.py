"""The matcher's geometry: Gaussian targets, the resize matrices of the native-resolution loss, the crops
(the authors' integer-offset crops and sdm's continuous ones), pasting maps back, and the authors' read-out."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


# ---- geometry -------------------------------------------------------------------------------------------------
def gaussian_maps(centers_xy: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """exp(-d^2 / (2 sigma^2)) around each centre (peak 1): B x 2 pixel (x, y), (H, W), sigma px -> B x H x W."""
    h, w = size
    ys = torch.arange(h, device=centers_xy.device, dtype=torch.float32)
    xs = torch.arange(w, device=centers_xy.device, dtype=torch.float32)
    dx2 = (xs.view(1, 1, w) - centers_xy[:, 0].float().view(-1, 1, 1)) ** 2
    dy2 = (ys.view(1, h, 1) - centers_xy[:, 1].float().view(-1, 1, 1)) ** 2
    return torch.exp(-(dx2 + dy2) / (2.0 * sigma**2))


def gaussian_profiles(centers_xy: torch.Tensor, size: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of `gaussian_maps` (an isotropic Gaussian is the outer product of two 1-D ones):
    B x 2 pixel (x, y) -> (B x H profile along y, B x W profile along x)."""
    h, w = size
    c = centers_xy.float()
    ys = torch.arange(h, device=c.device, dtype=torch.float32)
    xs = torch.arange(w, device=c.device, dtype=torch.float32)
    g_y = torch.exp(-((ys.view(1, h) - c[:, 1:2]) ** 2) / (2.0 * sigma**2))
    g_x = torch.exp(-((xs.view(1, w) - c[:, 0:1]) ** 2) / (2.0 * sigma**2))
    return g_y, g_x


@functools.lru_cache(maxsize=64)
def resize_matrix(
    n_in: int, n_out: int, align_corners: bool, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """n_out x n_in: the 1-D linear interpolation that bilinear `F.interpolate` applies along one axis (bilinear
    resizing of a map M is R_y M R_x^T)."""
    eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(0)  # 1 x channels x length: channel c is the unit vector e_c
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0].T


def upsampled_mse(
    maps: torch.Tensor, g_y: torch.Tensor, g_x: torch.Tensor, align_corners: bool
) -> torch.Tensor:
    """mean((R_y M R_x^T - g_y g_x^T)^2) over the H x W pixels, computed at the map's own resolution h x w.

    maps: B x h x w; g_y: B x H, g_x: B x W (a separable target). Returns B. Equal to bilinearly upsampling
    each map to H x W and taking the MSE (resizing is linear):
    ||R_y M R_x^T||^2 = <A_y M A_x, M> with A = R^T R (h x h, w x w); <R_y M R_x^T, g_y g_x^T> = (R_y^T g_y)^T M (R_x^T g_x).
    """
    _, h, w = maps.shape
    big_h, big_w = g_y.shape[1], g_x.shape[1]
    r_y = resize_matrix(h, big_h, align_corners, maps.device, maps.dtype)
    r_x = resize_matrix(w, big_w, align_corners, maps.device, maps.dtype)
    quad = ((r_y.T @ r_y) @ maps @ (r_x.T @ r_x) * maps).sum(dim=(1, 2))
    cross = torch.einsum("bi,bij,bj->b", g_y @ r_y, maps, g_x @ r_x)
    const = (g_y**2).sum(dim=1) * (g_x**2).sum(dim=1)
    return (quad - 2.0 * cross + const) / (big_h * big_w)


def random_crops(n: int, frac: float, generator: torch.Generator) -> torch.Tensor:
    """n crop boxes as n x 2 offsets o = (o_x, o_y) in [0, 1 - s] (normalised align-corners coordinates) for a
    crop of relative side s = `frac`; frac = 1 gives the full image. Drawn on the CPU (device-independent)."""
    if frac >= 1.0:
        return torch.zeros(n, 2)
    return torch.rand(n, 2, generator=generator) * (1.0 - frac)


def crop_images(pixels: torch.Tensor, offsets: torch.Tensor, frac: float) -> torch.Tensor:
    """B x 3 x H x W (or 1 x 3 x H x W, shared) and n x 2 offsets -> n x 3 x H x W crops resized back to H x W."""
    n = offsets.shape[0]
    h, w = pixels.shape[-2:]
    q_y = torch.linspace(0, 1, h, device=pixels.device)
    q_x = torch.linspace(0, 1, w, device=pixels.device)
    off = offsets.to(pixels.device, torch.float32)
    p_x = off[:, 0].view(n, 1, 1) + q_x.view(1, 1, w) * frac  # full-image position seen by crop pixel q
    p_y = off[:, 1].view(n, 1, 1) + q_y.view(1, h, 1) * frac
    grid = torch.stack([(2 * p_x - 1).expand(n, h, w), (2 * p_y - 1).expand(n, h, w)], dim=-1)
    src = pixels.expand(n, -1, -1, -1) if pixels.shape[0] == 1 else pixels
    return F.grid_sample(src.float(), grid, mode="bilinear", padding_mode="border", align_corners=True).to(pixels.dtype)


def paste_maps(maps: torch.Tensor, offsets: torch.Tensor, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-frame maps back into full-image coordinates: n x H x W maps and n x 2 offsets ->
    (n x H x W maps, zero outside the crop; n x H x W coverage in {0, 1})."""
    n, h, w = maps.shape
    off = offsets.to(maps.device, torch.float32)
    p_y = torch.linspace(0, 1, h, device=maps.device)
    p_x = torch.linspace(0, 1, w, device=maps.device)
    q_x = (p_x.view(1, 1, w) - off[:, 0].view(n, 1, 1)) / frac  # crop position of full-image pixel p
    q_y = (p_y.view(1, h, 1) - off[:, 1].view(n, 1, 1)) / frac
    q_x, q_y = q_x.expand(n, h, w), q_y.expand(n, h, w)
    eps = 1e-6
    inside = ((q_x >= -eps) & (q_x <= 1 + eps) & (q_y >= -eps) & (q_y <= 1 + eps)).float()
    grid = torch.stack([2 * q_x - 1, 2 * q_y - 1], dim=-1)
    pasted = F.grid_sample(maps.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return pasted.squeeze(1) * inside, inside


def crop_side(image_hw: tuple[int, int], frac: float) -> tuple[int, int]:
    """Hedlin et al.'s crop size: int(side * frac) per axis (477 px of 512 at their 93.165 %)."""
    return int(image_hw[0] * frac), int(image_hw[1] * frac)


def generator_words(n: int, generator: torch.Generator) -> torch.Tensor:
    """The next n 32-bit words of a CPU generator, as `torch.randint` consumes them for ranges below 2**28: one word a
    number, lo + word % range (ATen's `uniform_int_from_to`). Advances the generator as n such draws do. Each word is
    read back from two draws from the same state, word mod 2**27 and word mod 3**17: of the 32 numbers below 2**32
    with that low part, one has that residue (they differ by multiples of 2**27, coprime with 3**17). n -> n long."""
    state = generator.get_state()
    low = torch.randint(0, 2**27, (n,), generator=generator)
    generator.set_state(state)
    residue = torch.randint(0, 3**17, (n,), generator=generator)
    candidates = low[:, None] + (torch.arange(32) << 27)
    return candidates[candidates % 3**17 == residue[:, None]]


def margin_offsets(points_xy: torch.Tensor, image_hw: tuple[int, int], frac: float, margin: float, words: torch.Tensor) -> torch.Tensor:
    """`margin_crop_offsets` with its random words given (N x 2, from `generator_words`, on the points' device): the
    same offsets, computed where the points are, so points on a GPU are not read by the host. Returns N x 2 long."""
    (h, w), (ch, cw) = image_hw, crop_side(image_hw, frac)
    columns = []
    for axis, (side, c) in enumerate(((w, cw), (h, ch))):
        v, safe = points_xy[:, axis].double(), int(c * margin)  # double: the Python floats of the authors' bounds
        lo = (v - c + safe).clamp(0, side - c).long()  # min(max(0, .), side - c), then int(): all >= 0, so floor
        hi = (v - safe).clamp(0, side - c).long()
        columns.append(lo + words[:, axis] % (hi - lo + 1))
    return torch.stack(columns, dim=1)


def margin_crop_offsets(
    points_xy: torch.Tensor, image_hw: tuple[int, int], frac: float, margin: float, generator: torch.Generator
) -> torch.Tensor:
    """Integer top-left corners (x0, y0) of crops of side `crop_side`, one per point (N x 2 pixels), each drawn
    uniformly among the offsets that keep the point at least `margin` of the crop away from its borders, clamped
    to the image: Hedlin et al.'s `crop_image` (utils/optimize_token.py:474-502; x first, then y). Returns N x 2
    long on the CPU. Drawn from `generator` as one `torch.randint(lo, hi + 1)` a number, point by point, x then y."""
    words = generator_words(2 * points_xy.shape[0], generator).view(-1, 2)
    return margin_offsets(points_xy.detach().cpu(), image_hw, frac, margin, words)


def add_windows(sums: torch.Tensor, counts: torch.Tensor, maps: torch.Tensor, offsets: torch.Tensor) -> None:
    """Adds each item's maps into its window of the running sums, and 1 into the same window of its counts: for item
    i at offset (x0, y0), sums[i, :, y0 : y0 + h, x0 : x0 + w] += maps[i] (the authors' paste, optimize_token.py:
    302-305), one addition per pixel as with slices, but with offsets that stay on the device (no host read).
    sums m x L x H x W, counts m x 1 x H x W (views of the items' rows), maps m x L x h x w, offsets m x 2 long."""
    m, layers, h, w = maps.shape
    width = sums.shape[-1]
    rows = offsets[:, 1, None] + torch.arange(h, device=offsets.device)
    cols = offsets[:, 0, None] + torch.arange(w, device=offsets.device)
    index = (rows[:, :, None] * width + cols[:, None, :]).view(m, 1, h * w)
    sums.view(m, layers, -1).scatter_add_(2, index.expand(m, layers, h * w), maps.reshape(m, layers, h * w).to(sums.dtype))
    counts.view(m, 1, -1).scatter_add_(2, index, torch.ones((), dtype=counts.dtype, device=counts.device).expand(m, 1, h * w))


def cut_crops(pixels: torch.Tensor, offsets: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """1 x 3 x H x W and n x 2 integer (x0, y0) -> n x 3 x H x W: each crop of `side` (h, w) resized back to H x W,
    bilinear with align_corners=False (optimize_token.py:505-515)."""
    ch, cw = side
    crops = torch.cat([pixels[:, :, y0 : y0 + ch, x0 : x0 + cw] for x0, y0 in offsets.tolist()])
    return F.interpolate(crops.float(), size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False).to(pixels.dtype)


def layer_softmax_readout(maps: torch.Tensor) -> torch.Tensor:
    """Hedlin et al.'s read-out (utils/optimize.py:61-82): N x layers x H x W maps (already averaged over heads,
    crops and embeddings) -> N x H x W, the mean over layers of each layer's softmax over its H x W pixels;
    its argmax + 0.5 px is the match."""
    n, layers, h, w = maps.shape
    return maps.reshape(n, layers, h * w).softmax(dim=-1).reshape(n, layers, h, w).mean(dim=1)


__all__ = [
    "crop_images",
    "crop_side",
    "cut_crops",
    "gaussian_maps",
    "gaussian_profiles",
    "layer_softmax_readout",
    "margin_crop_offsets",
    "paste_maps",
    "random_crops",
    "resize_matrix",
    "upsampled_mse",
]
