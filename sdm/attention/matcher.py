"""`AttentionMatcher`: optimise embeddings on the source (`optimize_embeddings`), read their attention on a
target (`attention_maps`, `peaks`), both at once (`match`); `compile_for_matcher` for whole datasets."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from sdm.attention.capture import AttentionStore, capture_cross_attention
from sdm.attention.crops import GEOMETRIES
from sdm.attention.geometry import (
    crop_side,
    cut_crops,
    gaussian_maps,
    gaussian_profiles,
    layer_softmax_readout,
    upsampled_mse,
)
from sdm.attention.layers import _module_name, cross_attention_layers, execution_key, hedlin_layers
from sdm.config import (
    HEDLIN_MODEL,
    AttentionMatcherConfig,
)
from sdm.devices import upload
from sdm.features import ImageInput, run_until, to_pixel_tensor
from sdm.matching import argmax_2d, soft_argmax_2d
from sdm.models import StableDiffusion
from sdm.speed import optimize
from sdm.storage import FeatureStore


def compile_for_matcher(sd: StableDiffusion, channels_last: bool = False) -> StableDiffusion:
    """`torch.compile` the UNet's blocks (one graph per batch size, the capture processors traced in) and the VAE
    encoder, in place: `sdm.speed.optimize(compile_scope="blocks", dynamic=False)`, on channels-last weights with
    `channels_last`. Compiling takes minutes and pays on whole datasets with UNet batches of 50
    (benchmarks/README.md); results differ by rounding only."""
    return optimize(sd, channels_last=channels_last, fuse_qkv=False, compile=True, compile_scope="blocks", dynamic=False)


# The read-outs of the target's per-layer maps N x layers x H x W -> N x H x W: the authors' softmax per layer then
# the mean (utils/optimize.py:61-82), or the mean map (sdm 0.2).
READOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"authors": layer_softmax_readout, "mean-map": lambda maps: maps.mean(dim=1)}


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
        self.geometry = GEOMETRIES[cfg.geometry]  # how crops are drawn and maps placed (sdm.attention.crops)

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

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A tensor on the matcher's device, from the CPU without waiting for the GPU (`sdm.devices.upload`)."""
        return upload(host, self.device)

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

            def stored(offsets: torch.Tensor) -> torch.Tensor:
                xy = self._upload(offsets)
                return grid[xy[:, 1], xy[:, 0]]

            return stored
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
        noise = self._upload(draw(latents.shape, generator=generator)).to(latents.dtype)
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
        maps = store.layer_maps(self.config.token_index, size or self.map_size, self.config.heads, self.geometry.align_corners)[:, :, 0]  # M x layers x H x W
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
            align = self.geometry.align_corners
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
        embeddings = nn.Parameter(self._upload(init))
        optimizer = torch.optim.Adam([embeddings], lr=cfg.lr)
        centers_px = pts.repeat_interleave(e, dim=0)  # B x 2 resized pixels, point-major
        frac = cfg.crop_frac
        side = crop_side(tuple(cfg.image_size), frac)  # type: ignore[arg-type]
        crop_latents = self.geometry.crop_latents(self, pixels, side, frac)  # offsets -> VAE latents of those crops
        # Half-precision backward can underflow on these small losses; Adam is invariant to the scale.
        grad_scale = 256.0 if self.sd.unet.dtype == torch.float16 else 1.0
        losses = torch.zeros(cfg.steps, b, device=self.device)  # on the device: the loop never waits for the GPU
        pending: tuple[int, Callable[[], bool]] | None = None
        with capture_cross_attention(self.sd.unet, self.layers) as store:
            for step in tqdm(range(cfg.steps), desc="optimise embeddings", disable=not cfg.progress, leave=False):
                offsets, target_px = self.geometry.draw(centers_px, self, side, frac, gen)
                target_px = self._upload(target_px)
                optimizer.zero_grad(set_to_none=True)
                for chunk in self._chunks(b):
                    noisy = self._noisy(crop_latents(offsets[chunk]), cfg.opt_timestep, gen)
                    per_item = self._item_losses(noisy, embeddings[chunk], target_px[chunk], store)
                    (per_item.sum() * grad_scale).backward()
                    losses[step, chunk] = per_item.detach()
                # The previous step's check waits only for that step, so the GPU still has this one to run
                # and the host draws the next step's crops and noise meanwhile.
                if pending is not None:
                    _raise_if_non_finite(losses, e, *pending)
                pending = (step, _finite_later(losses[step]))
                optimizer.step()
                store.clear()  # drop the graph's tensors before the next step
        if pending is not None:
            _raise_if_non_finite(losses, e, *pending)
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
        flat = self._upload(embeddings.reshape(n * e, *embeddings.shape[2:]))
        with capture_cross_attention(self.sd.unet, self.layers) as store:
            per_layer = self.geometry.target_maps(self, pixels, flat, timestep, crops, frac, gen, store)
        per_layer = per_layer.view(n, e, *per_layer.shape[1:]).mean(dim=1)  # N x layers x H' x W'
        if not torch.isfinite(per_layer).all():  # an argmax of NaNs would silently answer (0, 0)
            raise FloatingPointError("non-finite attention maps on the target; run the UNet in float32 or bfloat16")
        out = READOUTS[cfg.readout](per_layer)
        return out.cpu()

    def peaks(self, maps: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Peaks of N x H' x W' maps (from `attention_maps`) -> N x 2 pixel (x, y) in an image of size
        `image_hw` = (H, W) (the original size of the image the maps were computed on)."""
        cfg = self.config
        if cfg.peak == "argmax":
            cells = argmax_2d(maps)
        else:
            scaled = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
            cells = soft_argmax_2d(scaled, cfg.soft_argmax_temperature)
        return self.geometry.to_pixels(cells, tuple(maps.shape[-2:]), tuple(cfg.image_size), image_hw)  # type: ignore[arg-type]

    def match(
        self, src_image: ImageInput, trg_image: ImageInput, src_points_xy: torch.Tensor | Sequence[Sequence[float]]
    ) -> torch.Tensor:
        """Matches N source points into the target: N x 2 pixel (x, y) in the source's own size ->
        N x 2 pixel (x, y) in the target's own size (CPU float32). Images: 3 x H x W tensors in [0, 1] or PIL."""
        return self.transfer(trg_image, self.optimize_embeddings(src_image, src_points_xy).embeddings)

    def transfer(self, trg_image: ImageInput, embeddings: torch.Tensor) -> torch.Tensor:
        """Where optimised embeddings (N x E x L x D) point in a target: N x 2 pixel (x, y) in its own size."""
        return self.peaks(self.attention_maps(trg_image, embeddings), _image_hw(trg_image))


def _finite_later(values: torch.Tensor) -> Callable[[], bool]:
    """Whether every entry of `values` is finite, read when called: on a GPU the answer is copied to pinned memory
    behind an event, so the call waits for the work queued up to now and not for what is queued later."""
    finite = torch.isfinite(values).all()
    if finite.device.type != "cuda":
        return lambda: bool(finite)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(finite, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> bool:
        done.synchronize()
        return bool(host)

    return read


def _raise_if_non_finite(losses: torch.Tensor, embeddings_per_point: int, step: int, finite: Callable[[], bool]) -> None:
    """Raises FloatingPointError naming the first non-finite loss of `step` (losses: steps x points * embeddings)."""
    if finite():
        return
    bad, e = int((~torch.isfinite(losses[step])).nonzero()[0]), embeddings_per_point
    raise FloatingPointError(
        f"non-finite attention loss at step {step + 1} (point {bad // e}, embedding {bad % e}); "
        "run the UNet in float32 or bfloat16 (float16 overflowed)"
    )


__all__ = [
    "READOUTS",
    "AttentionMatcher",
    "OptimizationResult",
    "compile_for_matcher",
]
