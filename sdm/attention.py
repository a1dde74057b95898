"""Hedlin et al.'s training-free matcher (NeurIPS 2023): optimise a prompt embedding per source point so that
the UNet's cross-attention peaks there, then read the peak of its attention on the target image.

Three layers:

* **Capture.** `capture_cross_attention(unet, layers)` installs `CrossAttentionCapture` processors on chosen
  cross-attention layers (``attn2`` of the transformer blocks) and restores the original processors on exit.
  The processor computes softmax(Q K^T * scale) explicitly, so the probabilities can be stored and
  differentiated (gradients reach the encoder hidden states), and computes the layer output from them
  exactly as diffusers' default processors do. Self-attention layers are never touched.
* **Layers.** `cross_attention_layers` lists every ``attn2`` with its spatial resolution for an input size;
  `hedlin_layers` is the paper's choice ("the up-block layers at 16 x 16 and the first at 32 x 32" for a
  512 px input), expressed relative to the latent (1/4 and 1/2 of its side) so small models get the
  analogous layers.
* **Matcher.** `AttentionMatcher(sd, AttentionMatcherConfig())`: `optimize_embeddings` (source),
  `attention_maps` (any image), `match` (both, pixels in, pixels out).

Coordinates: (x, y) pixels. Images are resized to ``config.image_size`` (aspect ratio not kept) and points
scaled per axis, as everywhere in `sdm`.

By default (``geometry="authors"``, ``readout="authors"``) the matcher computes what Hedlin et al.'s code
computes (github ubc-vision/LDM_correspondences at 97e3246; file:line in docs/choices.md): integer-offset
crops of int(side x crop_frac) px placed by a margin rule, maps upsampled without align corners, the four
corner crops then crops around the running argmax at inference, a softmax per layer before the mean, and the
argmax pixel + 0.5 as the match.

``geometry="continuous"`` keeps sdm 0.2's own geometry: attention maps upsampled with bilinear interpolation
under the align-corners convention (cell 0 <-> pixel 0, last cell <-> last pixel), and crops described in
normalised align-corners coordinates p = x / (W - 1) in [0, 1]: a crop with
offset o and scale s shows the full-image position p = o + q * s at its own position q in [0, 1]
(s = crop side / image side, the same on both axes). This makes crop <-> image mapping resolution-free.

Reading of the paper's settings (all in `AttentionMatcherConfig`, all configurable):

* "Gaussian of 28 px" is read as the standard deviation of the target, exp(-d^2 / (2 sigma^2)) with peak 1,
  at a 512 px input; `sigma` is stored relative to the image side (28 / 512), measured in the model-input
  frame of a crop (the crop is resized to the full input size before the UNet sees it).
* The target is compared with the attention probability of the chosen token as it is (mean over heads
  and layers, values in [0, 1]); a Gaussian with peak 1 then asks the token to win the softmax over the
  77 tokens at the query and to lose it far from it. ``normalize="minmax"`` rescales each map to [0, 1]
  first (only the shape of the map matters then).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from sdm.config import (
    HEDLIN_MODEL,
    AttentionMatcherConfig,
    HeadRule,
    size_pair,
)
from sdm.features import ImageInput, optimize, run_until, to_pixel_tensor
from sdm.matching import argmax_2d, soft_argmax_2d
from sdm.models import StableDiffusion
from sdm.storage import FeatureStore

_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


# ---- layers ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer: its diffusers processor name, spatial size (h, w) and number of heads."""

    name: str
    resolution: tuple[int, int]
    heads: int


def _module_name(processor_name: str) -> str:
    return processor_name.removesuffix(".processor")


def execution_key(name: str) -> tuple[int, ...]:
    """Sort key that puts processor names in the order the UNet runs them (down, mid, up; then by index).

    `unet.attn_processors` lists them in registration order, where the mid block comes last.
    """
    section = name.split(".", 1)[0]
    if section not in _SECTION_ORDER:
        raise ValueError(f"{name!r} is not an attention layer of a UNet2DConditionModel block")
    return (_SECTION_ORDER[section], *(int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", name)))


def _latent_hw(sd: StableDiffusion, image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = size_pair(image_size)
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    return h // factor, w // factor


def _block_resolutions(unet: UNet2DConditionModel, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(h, w) at which each down, mid and up block runs, e.g. {"down_blocks.0": (64, 64), ...}."""
    h, w = latent_hw
    down = []
    for block in unet.down_blocks:
        down.append((h, w))
        if getattr(block, "downsamplers", None) is not None:
            h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv with padding 1
    out = {f"down_blocks.{i}": hw for i, hw in enumerate(down)}
    out["mid_block"] = (h, w)
    # Up block i consumes the skips of down block n-1-i and upsamples to their size, so it runs at it.
    n = len(unet.down_blocks)
    if len(unet.up_blocks) != n:
        raise ValueError("the UNet's down and up paths differ in length; cannot infer layer resolutions")
    for i in range(n):
        out[f"up_blocks.{i}"] = down[n - 1 - i]
    return out


def cross_attention_layers(sd: StableDiffusion, image_size: int | tuple[int, int] = 512) -> list[CrossAttentionLayer]:
    """All cross-attention layers (``attn2`` of transformer blocks) in execution order, with the spatial
    resolution of their attention maps for an input of `image_size` pixels (int or (H, W))."""
    unet = sd.unet
    blocks = _block_resolutions(unet, _latent_hw(sd, image_size))
    modules = dict(unet.named_modules())
    layers = []
    for name in unet.attn_processors:
        module = modules[_module_name(name)]
        if not getattr(module, "is_cross_attention", False):
            continue
        block = "mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])
        layers.append(CrossAttentionLayer(name, blocks[block], int(module.heads)))
    return sorted(layers, key=lambda layer: execution_key(layer.name))


def hedlin_layers(sd: StableDiffusion, image_size: int | tuple[int, int] = 512) -> tuple[str, ...]:
    """Hedlin et al.'s layers: every up-block cross-attention at 1/4 of the latent side (16 x 16 for SD at
    512 px) plus the first one at 1/2 of it (32 x 32): for SD 1.x/2.x all ``attn2`` of ``up_blocks[1]``
    and the first of ``up_blocks[2]``."""
    latent = _latent_hw(sd, image_size)
    quarter = tuple((s + 3) // 4 for s in latent)
    half = tuple((s + 1) // 2 for s in latent)
    ups = [layer for layer in cross_attention_layers(sd, image_size) if layer.name.startswith("up_blocks")]
    chosen = [layer.name for layer in ups if layer.resolution == quarter]
    chosen += [layer.name for layer in ups if layer.resolution == half][:1]
    if not chosen:
        raise ValueError(f"no up-block cross-attention at {quarter} or {half} for image_size {image_size}")
    return tuple(chosen)


# ---- capture --------------------------------------------------------------------------------------------------
@dataclass
class AttentionStore:
    """Attention probabilities of the captured layers from the latest UNet forward.

    ``probs[name]`` is B x heads x (h * w) x L (softmax over the L tokens), kept in the autograd graph;
    ``resolutions[name]`` its (h, w). The store is emptied at the start of every UNet forward.
    """

    layers: tuple[str, ...]
    layer_resolutions: dict[tuple[int, int], dict[str, tuple[int, int]]] = field(default_factory=dict, repr=False)
    latent_hw: tuple[int, int] | None = None
    probs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    resolutions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def clear(self) -> None:
        self.probs.clear()
        self.resolutions.clear()

    def add(self, name: str, probs: torch.Tensor, resolution: tuple[int, int]) -> None:
        self.probs[name] = probs
        self.resolutions[name] = resolution

    def maps(
        self,
        token: int | Sequence[int] = 1,
        size: tuple[int, int] | None = None,
        heads: Sequence[int] | HeadRule | None = None,
    ) -> torch.Tensor:
        """Attention maps of the chosen tokens, averaged over heads and captured layers.

        heads: indices, "upper-half" (heads h/2..h-1 of each layer, what Hedlin et al.'s code averages), or
        None / "all". Each layer's map is upsampled (bilinear, align corners) to `size` = (H, W) (default: the
        largest captured resolution) before averaging. Returns B x T x H x W float32 (T tokens; T = 1 for an
        int), values in [0, 1].
        """
        return self.layer_maps(token, size, heads).mean(dim=1)

    def layer_maps(
        self,
        token: int | Sequence[int] = 1,
        size: tuple[int, int] | None = None,
        heads: Sequence[int] | HeadRule | None = None,
        align_corners: bool = True,
    ) -> torch.Tensor:
        """As `maps`, without the mean over layers: B x layers x T x H x W (layers in execution order).
        `align_corners=False` upsamples as Hedlin et al.'s code does (optimize_token.py:352-359)."""
        if size is None:
            size = max(self.resolutions.values(), key=lambda hw: hw[0] * hw[1])
        per_layer = []
        for m in self.native_maps(token, heads):
            if tuple(m.shape[-2:]) != tuple(size):
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=align_corners)
            per_layer.append(m)
        return torch.stack(per_layer, dim=1)

    def native_maps(
        self, token: int | Sequence[int] = 1, heads: Sequence[int] | HeadRule | None = None
    ) -> list[torch.Tensor]:
        """Each captured layer's maps at its own resolution, averaged over the chosen heads: a list (layers in
        execution order) of B x T x h x w float32."""
        missing = [name for name in self.layers if name not in self.probs]
        if missing:
            raise RuntimeError(f"no attention captured for {missing}; did the UNet forward reach these layers?")
        tokens = [token] if isinstance(token, int) else list(token)
        out = []
        for name in self.layers:
            probs = self.probs[name]
            if heads == "upper-half":
                probs = probs[:, probs.shape[1] // 2 :]
            elif heads is not None and heads != "all":
                if max(heads) >= probs.shape[1]:
                    raise ValueError(f"head index {max(heads)} out of range for {name} ({probs.shape[1]} heads)")
                probs = probs[:, list(heads)]
            h, w = self.resolutions[name]
            m = probs[..., tokens].float().mean(dim=1)  # B x hw x T
            out.append(m.transpose(1, 2).reshape(m.shape[0], len(tokens), h, w))
        return out


class CrossAttentionCapture:
    """Attention processor for a cross-attention layer that stores its probabilities in an `AttentionStore`.

    Computes softmax(Q K^T * scale) explicitly (float32 softmax; upcast settings of the layer honoured) and
    the output from it as diffusers' `AttnProcessor` does, so the UNet computes the same function. Calls
    without encoder hidden states (self-attention) go to the layer's original processor.
    """

    def __init__(self, name: str, store: AttentionStore, original: Any) -> None:
        self.name = name
        self.store = store
        self.original = original

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, None, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # B x heads x N x d
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # B x heads x L x d
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1])
        # float32 softmax: the maps are what we optimise, half-precision rounding would blur small gradients.
        probs = scores.float().softmax(dim=-1)  # B x heads x N x L
        self.store.add(self.name, probs, self._resolution(n_query))

        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _resolution(self, n_query: int) -> tuple[int, int]:
        store = self.store
        hw = None
        if store.latent_hw is not None:
            hw = store.layer_resolutions.get(store.latent_hw, {}).get(self.name)
        if hw is None or hw[0] * hw[1] != n_query:
            side = math.isqrt(n_query)
            if side * side != n_query:
                raise RuntimeError(f"cannot infer the spatial size of {self.name} from {n_query} query positions")
            hw = (side, side)
        return hw


@contextlib.contextmanager
def capture_cross_attention(unet: UNet2DConditionModel, layers: Sequence[str]) -> Iterator[AttentionStore]:
    """Within the context, the cross-attention probabilities of `layers` (processor names as in
    `unet.attn_processors`, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``) are
    captured into the yielded `AttentionStore` at every UNet forward.

    Only those layers get a new processor; the original processor objects are put back on exit, also when
    the body raises.
    """
    layers = tuple(sorted(dict.fromkeys(layers), key=execution_key))
    if not layers:
        raise ValueError("no layers to capture")
    processors = unet.attn_processors
    modules = dict(unet.named_modules())
    unknown = [name for name in layers if name not in processors]
    if unknown:
        raise ValueError(f"unknown attention layers {unknown}; see cross_attention_layers() for valid names")
    not_cross = [name for name in layers if not getattr(modules[_module_name(name)], "is_cross_attention", False)]
    if not_cross:
        raise ValueError(f"not cross-attention layers (attn2): {not_cross}")

    store = AttentionStore(layers)

    def before_forward(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        store.clear()
        if sample is not None:
            latent = (int(sample.shape[-2]), int(sample.shape[-1]))
            store.latent_hw = latent
            if latent not in store.layer_resolutions:
                blocks = _block_resolutions(unet, latent)
                store.layer_resolutions[latent] = {
                    name: blocks["mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])]
                    for name in layers
                }

    originals = {name: processors[name] for name in layers}
    handle = unet.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        for name in layers:
            modules[_module_name(name)].set_processor(CrossAttentionCapture(name, store, originals[name]))
        yield store
    finally:
        handle.remove()
        for name, processor in originals.items():
            modules[_module_name(name)].set_processor(processor)


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


def margin_crop_offsets(
    points_xy: torch.Tensor, image_hw: tuple[int, int], frac: float, margin: float, generator: torch.Generator
) -> torch.Tensor:
    """Integer top-left corners (x0, y0) of crops of side `crop_side`, one per point (N x 2 pixels), each drawn
    uniformly among the offsets that keep the point at least `margin` of the crop away from its borders, clamped
    to the image: Hedlin et al.'s `crop_image` (utils/optimize_token.py:474-502; x first, then y). Returns N x 2
    long. Drawn on the CPU from `generator`."""
    h, w = image_hw
    ch, cw = crop_side(image_hw, frac)
    out = torch.zeros(points_xy.shape[0], 2, dtype=torch.long)
    for i, (x, y) in enumerate(points_xy.tolist()):
        for axis, (v, side, c) in enumerate(((x, w, cw), (y, h, ch))):
            safe = int(c * margin)
            lo = min(max(0, v - c + safe), side - c)
            hi = min(max(0, v - safe), side - c)
            out[i, axis] = int(torch.randint(int(lo), int(hi) + 1, (1,), generator=generator))
    return out


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


def compile_for_matcher(sd: StableDiffusion, channels_last: bool = False) -> StableDiffusion:
    """`torch.compile` the UNet's blocks (one graph per batch size, the capture processors traced in) and the VAE
    encoder, in place: `sdm.features.optimize(compile_scope="blocks", dynamic=False)`, on channels-last weights with
    `channels_last`. Compiling takes minutes and pays on whole datasets with UNet batches of 50
    (benchmarks/README.md); results differ by rounding only."""
    return optimize(sd, channels_last=channels_last, fuse_qkv=False, compile=True, compile_scope="blocks", dynamic=False)


# ---- the matcher ----------------------------------------------------------------------------------------------
@dataclass
class OptimizationResult:
    """Output of `AttentionMatcher.optimize_embeddings`.

    embeddings: N x E x L x D (points x embeddings per point x tokens x text width), float32, detached.
    losses: steps x N x E, the MSE of each embedding at each step.
    """

    embeddings: torch.Tensor
    losses: torch.Tensor


def _image_hw(image: ImageInput) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image must be a 3 x H x W tensor in [0, 1] or a PIL image; got shape {tuple(image.shape)}")
        return int(image.shape[1]), int(image.shape[2])
    raise TypeError(f"an image must be a 3 x H x W tensor in [0, 1] or a PIL image; got {type(image).__name__}")


class AttentionMatcher:
    """Hedlin et al.'s unsupervised matcher on a frozen Stable Diffusion model.

    ``AttentionMatcher(sd, config).match(src, trg, points)``: for each source point, `num_embeddings`
    randomly initialised encoder-hidden-state sequences (1 x 77 x D each) are optimised with Adam so that
    the averaged cross-attention map of token `token_index` matches a Gaussian at the point, over random
    crops of the source at timestep `opt_timestep`; then the embeddings are applied to `inference_crops`
    crops of the target at `inference_timestep`, the maps pasted back and averaged, and the peak is the
    match. All points x embeddings of a call share one batch per step. Results are deterministic for a
    fixed `config.seed` (crops, noise and initialisation are drawn on the CPU).

    The VAE latents of an image's crops are kept in `crop_store` (by pixel content, `config.crop_store` images), so an
    image met again, as a source or a target, is not encoded again; call `crop_store.reset()` after changing the
    VAE's weights in place.
    """

    def __init__(self, sd: StableDiffusion, config: AttentionMatcherConfig | None = None) -> None:
        self.sd = sd
        self.config = config or AttentionMatcherConfig()
        cfg = self.config
        prediction = getattr(sd.scheduler.config, "prediction_type", "epsilon")
        if not sd.random_weights and (sd.embed_dim != 768 or prediction != "epsilon"):
            warnings.warn(
                f"{sd.name} is not a Stable Diffusion 1.x model (text width {sd.embed_dim}, {prediction}-prediction); "
                f"Hedlin et al.'s settings (timesteps, sigma, lr, layers) were tuned for {HEDLIN_MODEL}",
                stacklevel=2,
            )
        n_t = sd.scheduler.config.num_train_timesteps
        for name in ("opt_timestep", "inference_timestep"):
            if not 0 <= getattr(cfg, name) < n_t:
                raise ValueError(f"{name} must be in 0..{n_t - 1}; got {getattr(cfg, name)}")
        self.layers = tuple(sorted(cfg.layers or hedlin_layers(sd, cfg.image_size), key=execution_key))
        known = {layer.name for layer in cross_attention_layers(sd, cfg.image_size)}
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            raise ValueError(f"not cross-attention layers of this UNet: {unknown}; see cross_attention_layers()")
        # Nothing after the last chosen layer influences the maps: the UNet stops right after that layer.
        self.stop_module = dict(sd.unet.named_modules())[_module_name(self.layers[-1])]
        self.map_size: tuple[int, int] = cfg.map_size or cfg.image_size  # type: ignore[assignment]
        # latents of every crop of an image, by (pixel digest, crop side); `crop_store.reset()` if the VAE changes
        self.crop_store = FeatureStore(max(cfg.crop_store, 1))

    # ---- helpers ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sd.device

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        """One image -> 1 x 3 x H x W in [-1, 1] at `image_size`, float32 on the model's device."""
        _image_hw(image)
        return to_pixel_tensor(image, self.config.image_size, self.device, torch.float32)

    def _points(self, points_xy: torch.Tensor | Sequence[Sequence[float]], image_hw: tuple[int, int]) -> torch.Tensor:
        """N x 2 original pixels -> N x 2 pixels of the image resized to `image_size`, x' = x W'/W (CPU float32):
        exact for the datasets' already resized points (W = W'), as the authors' `src_kps / 512 * 512` is
        (utils/optimize.py:52, utils/optimize_token.py:568), so the crop bounds (:490-502) truncate the very value they do."""
        pts = torch.as_tensor(points_xy, dtype=torch.float32).detach().cpu()
        if pts.dim() != 2 or pts.shape[-1] != 2:
            raise ValueError(f"points must be N x 2 pixel (x, y); got shape {tuple(pts.shape)}")
        if pts.shape[0] == 0:
            raise ValueError("no points to match (N = 0)")
        if not torch.isfinite(pts).all():
            raise ValueError("points must be finite")
        h, w = image_hw
        outside = (pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)
        if outside.any():
            bad = pts[outside][0].tolist()
            raise ValueError(f"point {bad} lies outside the source image of size W x H = {w} x {h}")
        size_h, size_w = self.config.image_size  # type: ignore[misc]
        resized = pts if (h, w) == (size_h, size_w) else pts * torch.tensor([size_w / w, size_h / h])
        return torch.minimum(resized.clamp(min=0.0), torch.tensor([size_w - 1.0, size_h - 1.0]))

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.sd.vae
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor

    def _crop_bank(self, pixels: torch.Tensor, side: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """offsets n x 2 integer (x0, y0) -> n x 4 x h x w VAE latents of those crops of `pixels` (1 x 3 x H x W).

        With `crop_store` > 0 every offset's latent is looked up in the grid of all (H - ch + 1) x (W - cw + 1) crops
        of the image, encoded once per image content (a source needs nearly all of them over its 129 steps; a target's
        800 draws hit about half) in fixed micro-batches. Otherwise each call encodes the crops it draws, the new ones
        of a draw together, and forgets them afterwards."""
        if self.config.crop_store > 0:
            grid = self._crop_grid(pixels, side)
            return lambda offsets: grid[offsets[:, 1].to(grid.device), offsets[:, 0].to(grid.device)]
        cache: dict[tuple[int, int], torch.Tensor] = {}

        def lazy(offsets: torch.Tensor) -> torch.Tensor:
            keys = [tuple(o) for o in offsets.tolist()]
            missing = list(dict.fromkeys(k for k in keys if k not in cache))
            for chunk in self._chunks(len(missing)):
                cache.update(zip(missing[chunk], self._encode(cut_crops(pixels, torch.tensor(missing[chunk]), side))))
            return torch.stack([cache[k] for k in keys])

        return lazy

    def _crop_grid(self, pixels: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
        """(H - ch + 1) x (W - cw + 1) x 4 x h x w: the latents of the crop at (x0, y0) at [y0, x0], from the store or
        encoded now (row-major, in micro-batches of `max_batch`)."""
        key = (hashlib.sha1(pixels.float().cpu().numpy().tobytes()).hexdigest(), side)
        grid = self.crop_store.get(key)
        if grid is None:
            rows, cols = pixels.shape[-2] - side[0] + 1, pixels.shape[-1] - side[1] + 1
            ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            offsets = torch.stack([xs.flatten(), ys.flatten()], dim=1)
            chunks = tqdm(self._chunks(len(offsets)), desc="encode crops", disable=not self.config.progress, leave=False)
            grid = torch.cat([self._encode(cut_crops(pixels, offsets[c], side)) for c in chunks])
            grid = grid.view(rows, cols, *grid.shape[1:])
            self.crop_store.put(key, grid)
        return grid

    def _noisy(self, latents: torch.Tensor, timestep: int, generator: torch.Generator) -> torch.Tensor:
        # The authors noise with U[0, 1) (torch.rand_like, optimize_token.py:289-291 and 589-591), about 3.5x
        # less energy than N(0, 1) at the same timestep; their timesteps were tuned under it.
        draw = torch.rand if self.config.noise == "uniform" else torch.randn
        noise = draw(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
        return self.sd.scheduler.add_noise(latents, noise, t)

    def _unet_maps(
        self,
        noisy: torch.Tensor,
        hidden: torch.Tensor,
        timestep: int,
        store: AttentionStore,
        per_layer: bool = False,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Noisy latents M x 4 x h x w and hidden states M x L x D -> M x H x W maps of the chosen token (the mean
        over layers), or M x layers x H x W with `per_layer`; H x W = `size` (default `map_size`)."""
        self._run_unet(noisy, hidden, timestep)
        align = self.config.geometry == "continuous"
        maps = store.layer_maps(self.config.token_index, size or self.map_size, self.config.heads, align)[:, :, 0]  # M x layers x H x W
        if self.config.normalize == "minmax":
            lo = maps.flatten(2).amin(2)[..., None, None]
            hi = maps.flatten(2).amax(2)[..., None, None]
            maps = (maps - lo) / (hi - lo).clamp_min(1e-8)
        return maps if per_layer else maps.mean(dim=1)

    def _run_unet(self, noisy: torch.Tensor, hidden: torch.Tensor, timestep: int) -> None:
        """UNet forward up to the last captured layer; the maps land in the capture's store."""
        unet = self.sd.unet
        t = torch.full((noisy.shape[0],), timestep, device=noisy.device, dtype=torch.long)
        run_until(unet, self.stop_module, noisy.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype))

    def _chunks(self, n: int) -> list[slice]:
        size = self.config.max_batch or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _sigma_px(self) -> float:
        h, w = self.map_size
        return self.config.sigma * (h + w) / 2.0

    def _item_losses(self, noisy: torch.Tensor, hidden: torch.Tensor, target_px: torch.Tensor, store: AttentionStore) -> torch.Tensor:
        """One optimisation micro-batch's loss per item: noisy latents M x 4 x h x w, hidden states M x L x D and Gaussian
        centres M x 2 (map pixels, on the device) -> M losses, in the autograd graph of `hidden`. The code's loss: the
        MSE of each layer's map against the Gaussian, averaged over layers and pixels (optimize_token.py:606-621), so
        that every layer, not only their mean, peaks at the point."""
        cfg = self.config
        size = self.map_size
        sigma = self._sigma_px()
        if cfg.loss_resolution == "native" and cfg.loss == "per-layer" and cfg.normalize == "none":
            self._run_unet(noisy, hidden, cfg.opt_timestep)
            g_y, g_x = gaussian_profiles(target_px, size, sigma)
            align = cfg.geometry == "continuous"
            per_layer = [upsampled_mse(m[:, 0], g_y, g_x, align) for m in store.native_maps(cfg.token_index, cfg.heads)]
            return torch.stack(per_layer, dim=1).mean(dim=1)
        maps = self._unet_maps(noisy, hidden, cfg.opt_timestep, store, per_layer=True)
        if cfg.loss == "layer-mean":
            maps = maps.mean(dim=1, keepdim=True)
        target = gaussian_maps(target_px, size, sigma)
        return ((maps - target[:, None]) ** 2).mean(dim=(1, 2, 3))

    # ---- optimisation -----------------------------------------------------------------------------------------
    def optimize_embeddings(
        self, image: ImageInput, points_xy: torch.Tensor | Sequence[Sequence[float]], *, seed: int | None = None
    ) -> OptimizationResult:
        """Optimises `num_embeddings` embeddings per point so that their attention peaks at the point.

        Args:
            image: the source, a 3 x H x W tensor in [0, 1] or a PIL image (any size).
            points_xy: N x 2 pixel (x, y) in the source's own size, inside the image.
            seed: of the initialisation, crops and noise; default the config's `seed`.
        Returns:
            `OptimizationResult` (embeddings N x E x L x D, losses steps x N x E).
        """
        cfg = self.config
        pts = self._points(points_xy, _image_hw(image))
        pixels = self._pixels(image)
        n, e = pts.shape[0], cfg.num_embeddings
        b = n * e
        gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        init = torch.randn((b, cfg.num_tokens, self.sd.embed_dim), generator=gen) * cfg.init_std
        embeddings = nn.Parameter(init.to(self.device))
        optimizer = torch.optim.Adam([embeddings], lr=cfg.lr)
        centers_px = pts.repeat_interleave(e, dim=0)  # B x 2 resized pixels, point-major
        map_h, map_w = self.map_size
        size_h, size_w = cfg.image_size  # type: ignore[misc]
        frac = cfg.crop_frac
        side = crop_side((size_h, size_w), frac)
        centers = centers_px / torch.tensor([size_w - 1, size_h - 1])  # normalised align-corners: the continuous crops
        # offsets -> VAE latents of those crops; continuous offsets are new at every draw, so nothing is kept
        crop_latents: Callable[[torch.Tensor], torch.Tensor] = (
            self._crop_bank(pixels, side) if cfg.geometry == "authors" else lambda o: self._encode(crop_images(pixels, o, frac))
        )
        # Half-precision backward can underflow on these small losses; Adam is invariant to the scale.
        grad_scale = 256.0 if self.sd.unet.dtype == torch.float16 else 1.0
        losses = torch.zeros(cfg.steps, b, device=self.device)  # on the device: one host sync per step, not per batch
        with capture_cross_attention(self.sd.unet, self.layers) as store:
            for step in tqdm(range(cfg.steps), desc="optimise embeddings", disable=not cfg.progress, leave=False):
                if cfg.geometry == "authors":
                    offsets = margin_crop_offsets(centers_px, (size_h, size_w), frac, cfg.crop_margin, gen)
                    # their new_pixel = (x - x0) / crop side, times the map side, on the grid arange(side)
                    q = (centers_px - offsets) / torch.tensor([side[1], side[0]])
                    target_px = q * torch.tensor([map_w, map_h])
                else:
                    offsets = random_crops(b, frac, gen)
                    # The Gaussian moves with the crop: centre in the crop frame q = (p - o) / s, in map pixels.
                    q = (centers - offsets) / frac
                    target_px = q * torch.tensor([map_w - 1, map_h - 1])
                target_px = target_px.to(self.device)
                optimizer.zero_grad(set_to_none=True)
                for chunk in self._chunks(b):
                    noisy = self._noisy(crop_latents(offsets[chunk]), cfg.opt_timestep, gen)
                    per_item = self._item_losses(noisy, embeddings[chunk], target_px[chunk], store)
                    (per_item.sum() * grad_scale).backward()
                    losses[step, chunk] = per_item.detach()
                finite = torch.isfinite(losses[step])
                if not finite.all():
                    bad = int((~finite).nonzero()[0])
                    raise FloatingPointError(
                        f"non-finite attention loss at step {step + 1} (point {bad // e}, embedding {bad % e}); "
                        "run the UNet in float32 or bfloat16 (float16 overflowed)"
                    )
                optimizer.step()
                store.clear()  # drop the graph's tensors before the next step
        losses = losses.cpu().view(cfg.steps, n, e)
        return OptimizationResult(embeddings.detach().view(n, e, cfg.num_tokens, -1).float(), losses)

    # ---- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(
        self,
        image: ImageInput,
        embeddings: torch.Tensor,
        *,
        timestep: int | None = None,
        crops: int | None = None,
        crop_frac: float | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The map whose peak is the match, per point: attention of the embeddings on an image over crops,
        averaged over crops and embeddings, then read out (`readout`).

        Args:
            image: a 3 x H x W tensor in [0, 1] or a PIL image.
            embeddings: N x E x L x D (from `optimize_embeddings`), or N x L x D.
            timestep, crops, crop_frac, seed: default to the config's inference settings
                (`inference_timestep`, `inference_crops`, `inference_crop_frac` or `crop_frac`, `seed` + 1).
        Returns:
            N x H' x W' float32 maps on the CPU (H' x W' = `map_size`, default `image_size`) over the image resized
            to `image_size`. readout "authors": the mean over layers of each layer's softmax over the pixels
            (utils/optimize.py:61-82); "mean-map": the mean over layers of the attention maps.
        """
        cfg = self.config
        timestep = cfg.inference_timestep if timestep is None else int(timestep)
        crops = cfg.inference_crops if crops is None else int(crops)
        frac = crop_frac if crop_frac is not None else (cfg.inference_crop_frac or cfg.crop_frac)
        if crops < 1 or not 0.1 <= frac <= 1.0:
            raise ValueError(f"need crops >= 1 and crop_frac in [0.1, 1]; got {crops}, {frac}")
        if embeddings.dim() == 3:
            embeddings = embeddings.unsqueeze(1)
        if embeddings.dim() != 4 or embeddings.shape[-1] != self.sd.embed_dim:
            raise ValueError(f"embeddings must be N x E x L x {self.sd.embed_dim}; got {tuple(embeddings.shape)}")
        n, e = embeddings.shape[:2]
        gen = torch.Generator().manual_seed(cfg.seed + 1 if seed is None else seed)
        pixels = self._pixels(image)
        flat = embeddings.reshape(n * e, *embeddings.shape[2:]).to(self.device)
        with capture_cross_attention(self.sd.unet, self.layers) as store:
            if cfg.geometry == "authors":
                per_layer = self._maps_over_margin_crops(pixels, flat, timestep, crops, frac, gen, store)
            else:
                per_layer = self._maps_over_random_crops(pixels, flat, timestep, 1.0 if crops == 1 else frac, crops, gen, store)
        per_layer = per_layer.view(n, e, *per_layer.shape[1:]).mean(dim=1)  # N x layers x H' x W'
        if not torch.isfinite(per_layer).all():  # an argmax of NaNs would silently answer (0, 0)
            raise FloatingPointError("non-finite attention maps on the target; run the UNet in float32 or bfloat16")
        out = layer_softmax_readout(per_layer) if cfg.readout == "authors" else per_layer.mean(dim=1)
        return out.cpu()

    def _maps_over_margin_crops(
        self,
        pixels: torch.Tensor,
        flat: torch.Tensor,
        timestep: int,
        crops: int,
        frac: float,
        gen: torch.Generator,
        store: AttentionStore,
    ) -> torch.Tensor:
        """Hedlin et al.'s inference (utils/optimize_token.py:256-310), for every embedding at once: crops centred
        (with the margin rule) on the four corners, then on the argmax of the maps gathered so far; fresh noise for
        each; each crop's per-layer maps upsampled to the crop side and added where the crop lies. Returns
        M x layers x H' x W' (M = embeddings), the per-pixel mean over the crops covering it."""
        size = tuple(self.config.image_size)  # type: ignore[arg-type]
        if tuple(self.map_size) != size:
            raise ValueError("geometry 'authors' pastes crops in image pixels: leave map_size at image_size")
        h, w = size
        side = crop_side(size, frac)
        m, layers = flat.shape[0], len(self.layers)
        sums = torch.zeros(m, layers, h, w, device=self.device)
        counts = torch.zeros(m, 1, h, w, device=self.device)
        corners = torch.tensor([[0.0, 0.0], [0.0, float(h)], [float(w), 0.0], [float(w), float(h)]])  # (x, y) as the code
        crop_latents = self._crop_bank(pixels, side)
        for it in tqdm(range(crops), desc="attention maps", disable=not self.config.progress, leave=False):
            if it < 4:
                locs = corners[it].expand(m, 2)
            else:
                running = torch.nan_to_num(sums / counts).mean(dim=1)  # uncovered pixels (0 / 0) count as 0
                locs = argmax_2d(running).float().cpu() + 0.5
            offsets = margin_crop_offsets(locs, size, frac, self.config.crop_margin, gen)
            noisy = self._noisy(crop_latents(offsets), timestep, gen)
            for chunk in self._chunks(m):
                maps = self._unet_maps(noisy[chunk], flat[chunk], timestep, store, per_layer=True, size=side)
                for i, (x0, y0) in zip(range(chunk.start, chunk.stop), offsets[chunk].tolist()):
                    sums[i, :, y0 : y0 + side[0], x0 : x0 + side[1]] += maps[i - chunk.start]
                    counts[i, :, y0 : y0 + side[0], x0 : x0 + side[1]] += 1
        return sums / counts.clamp_min(1.0)

    def _maps_over_random_crops(
        self,
        pixels: torch.Tensor,
        flat: torch.Tensor,
        timestep: int,
        frac: float,
        crops: int,
        gen: torch.Generator,
        store: AttentionStore,
    ) -> torch.Tensor:
        """sdm 0.2's inference (geometry "continuous"): `crops` random continuous crops shared by all embeddings,
        one noise draw per crop, maps pasted back with align corners. Returns M x layers x H' x W'."""
        offsets = random_crops(crops, frac, gen)
        latents = torch.cat([self._encode(crop_images(pixels, offsets[c], frac)) for c in self._chunks(crops)])
        noisy = self._noisy(latents, timestep, gen)  # one noise draw per crop, shared by all embeddings
        m, layers = flat.shape[0], len(self.layers)
        # Items are (embedding, crop) pairs, crop-minor: item i uses embedding i // crops and crop i % crops.
        acc = torch.zeros(m, layers, *self.map_size, device=self.device)
        _, coverage = paste_maps(torch.zeros(crops, *self.map_size, device=self.device), offsets, frac)
        for chunk in self._chunks(m * crops):
            idx = torch.arange(chunk.start, chunk.stop)
            emb_idx, crop_idx = idx // crops, idx % crops
            maps = self._unet_maps(noisy[crop_idx.to(noisy.device)], flat[emb_idx.to(self.device)], timestep, store, per_layer=True)
            pasted, _ = paste_maps(maps.flatten(0, 1), offsets[crop_idx].repeat_interleave(layers, dim=0), frac)
            acc.index_add_(0, emb_idx.to(self.device), pasted.view(-1, layers, *self.map_size))
        return acc / coverage.sum(0).clamp_min(1.0)

    def peaks(self, maps: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Peaks of N x H' x W' maps (from `attention_maps`) -> N x 2 pixel (x, y) in an image of size
        `image_hw` = (H, W) (the original size of the image the maps were computed on)."""
        cfg = self.config
        if cfg.peak == "argmax":
            cells = argmax_2d(maps)
        else:
            scaled = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
            cells = soft_argmax_2d(scaled, cfg.soft_argmax_temperature)
        map_h, map_w = maps.shape[-2:]
        h, w = image_hw
        size_h, size_w = cfg.image_size  # type: ignore[misc]
        if cfg.geometry == "authors":
            # the code's pixel of the argmax + 0.5 on the resized image (utils/optimize.py:79-82), then per axis
            # back to the original image: x = x' * W / W'
            return (cells.float() + 0.5) * cells.new_tensor([w / size_w, h / size_h])
        # map cell -> normalised [0, 1] -> original pixels (align corners on the resized image, then per-axis
        # resize back: x = x' * W / W').
        norm = cells / cells.new_tensor([map_w - 1, map_h - 1])
        return norm * cells.new_tensor([(size_w - 1) * w / size_w, (size_h - 1) * h / size_h])

    def match(
        self, src_image: ImageInput, trg_image: ImageInput, src_points_xy: torch.Tensor | Sequence[Sequence[float]]
    ) -> torch.Tensor:
        """Matches N source points into the target: N x 2 pixel (x, y) in the source's own size ->
        N x 2 pixel (x, y) in the target's own size (CPU float32). Images: 3 x H x W tensors in [0, 1] or PIL."""
        return self.transfer(trg_image, self.optimize_embeddings(src_image, src_points_xy).embeddings)

    def transfer(self, trg_image: ImageInput, embeddings: torch.Tensor) -> torch.Tensor:
        """Where optimised embeddings (N x E x L x D) point in a target: N x 2 pixel (x, y) in its own size."""
        return self.peaks(self.attention_maps(trg_image, embeddings), _image_hw(trg_image))


__all__ = [
    "HEDLIN_MODEL",
    "AttentionMatcher",
    "AttentionMatcherConfig",
    "AttentionStore",
    "CrossAttentionCapture",
    "CrossAttentionLayer",
    "OptimizationResult",
    "capture_cross_attention",
    "compile_for_matcher",
    "crop_images",
    "crop_side",
    "cross_attention_layers",
    "cut_crops",
    "execution_key",
    "gaussian_maps",
    "gaussian_profiles",
    "hedlin_layers",
    "layer_softmax_readout",
    "margin_crop_offsets",
    "paste_maps",
    "random_crops",
    "resize_matrix",
    "upsampled_mse",
]
