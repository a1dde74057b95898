"""Hedlin et al.'s attention matcher on the tiny random-weight model (64 px inputs).

Settings of the optimisation tests: with random weights the hedlin layers of the tiny model are 2 x 2 and
4 x 4 maps and barely depend on the image, so those tests use the up_blocks[3] layers (8 x 8 at 64 px)
and a large learning rate (0.3; the random model's attention logits are small). Measured on seeds 0-4
(4 points, 2 embeddings, 30 steps, 4 inference crops): loss ratio last/first 0.73-0.86, self-match mean
error 3.0-4.6 px (max single point 6.4 px); a random guess is ~25 px off.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdm
from sdm.attention import (
    AttentionMatcher,
    AttentionMatcherConfig,
    AttentionStore,
    capture_cross_attention,
    crop_images,
    cross_attention_layers,
    gaussian_maps,
    gaussian_profiles,
    hedlin_layers,
    paste_maps,
    upsampled_mse,
)
from sdm.features import run_until

SIZE = 64
POINTS = torch.tensor([[16.0, 16.0], [48.0, 20.0], [32.0, 40.0], [20.0, 52.0]])


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: with a second busy process on 2 cores, two threads are often 10x slower than one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    return torch.nn.functional.interpolate(photo[None], size=(SIZE, SIZE), mode="bilinear", antialias=True)[0]


def fine_layers(sd: sdm.StableDiffusion) -> tuple[str, ...]:
    return tuple(layer.name for layer in cross_attention_layers(sd, SIZE) if layer.name.startswith("up_blocks.3"))


def quick_config(sd: sdm.StableDiffusion, **kw) -> AttentionMatcherConfig:
    base = dict(image_size=SIZE, layers=fine_layers(sd), steps=30, num_embeddings=2, inference_crops=4, lr=0.3, progress=False)
    base.update(kw)
    return AttentionMatcherConfig(**base)


def unet_inputs(batch: int = 2, latent: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    hidden = torch.randn(batch, 77, 32, generator=g)
    return x, torch.full((batch,), 50), hidden


# ---- layers and capture ---------------------------------------------------------------------------------------
def test_layer_listing_and_hedlin_rule(sd: sdm.StableDiffusion) -> None:
    layers = {layer.name: layer.resolution for layer in cross_attention_layers(sd, 512)}
    assert all(name.endswith("attn2.processor") for name in layers) and len(layers) == 10
    assert layers["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == (16, 16)
    assert layers["up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"] == (32, 32)
    assert hedlin_layers(sd, 512) == (
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
    )


def test_capture_restores_processors(sd: sdm.StableDiffusion) -> None:
    unet = sd.unet
    before = unet.attn_processors
    names = hedlin_layers(sd, SIZE)
    with capture_cross_attention(unet, names):
        during = unet.attn_processors
        assert all(during[n] is not before[n] for n in names)
        assert all(during[n] is before[n] for n in before if n not in names)  # self-attention etc. untouched
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)

    with pytest.raises(KeyError), capture_cross_attention(unet, names):
        raise KeyError("boom")
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before)

    with pytest.raises(ValueError, match="not cross-attention"):
        with capture_cross_attention(unet, ["up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"]):
            pass
    with pytest.raises(ValueError, match="unknown"):
        with capture_cross_attention(unet, ["up_blocks.9.attn2.processor"]):
            pass


def test_captured_maps_shapes_and_normalisation(sd: sdm.StableDiffusion) -> None:
    layers = cross_attention_layers(sd, SIZE)
    x, t, hidden = unet_inputs()
    with torch.no_grad(), capture_cross_attention(sd.unet, [layer.name for layer in layers]) as store:
        sd.unet(x, t, encoder_hidden_states=hidden)
        for layer in layers:
            probs = store.probs[layer.name]
            h, w = layer.resolution
            assert store.resolutions[layer.name] == (h, w)
            assert probs.shape == (2, layer.heads, h * w, 77)
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5, rtol=0)
        maps = store.maps(token=[1, 2], size=(SIZE, SIZE))
    assert maps.shape == (2, 2, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1


def test_maps_pick_tokens_and_heads_as_list_indexing_does_without_an_index_tensor(sd: sdm.StableDiffusion) -> None:
    """Tokens and heads are taken as list indexing takes them; consecutive ones as a slice, because a list index is
    copied to the GPU first and that copy waits for the whole UNet (four times a pass with Hedlin et al.'s layers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sdm.attention.capture import _pick

    t = torch.randn(2, 4, 6, 5)
    for dim, idx in ((-1, [1]), (-1, [-1]), (-1, [1, 2, 3]), (-1, [3, 1]), (1, (2, 3)), (1, [0, 2]), (1, [])):
        want = t[..., idx] if dim == -1 else t[:, list(idx)]
        got = _pick(t, dim, idx)
        assert got.is_contiguous() and torch.equal(got, want)
    with pytest.raises(IndexError, match="out of range"):
        _pick(t, -1, [5])

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    layers = hedlin_layers(sd, SIZE)
    x, t_step, hidden = unet_inputs()
    seen: set[str] = set()
    with torch.no_grad(), capture_cross_attention(sd.unet, layers) as store:
        sd.unet(x, t_step, encoder_hidden_states=hidden)
        with Ops():
            store.native_maps(1, "upper-half")
            store.native_maps([1, 2], [0, 1])
    assert "index" not in seen and "index_select" not in seen


def test_capture_processor_matches_default_output(sd: sdm.StableDiffusion) -> None:
    unet = sd.unet
    x, t, hidden = unet_inputs()
    all_cross = [layer.name for layer in cross_attention_layers(sd, SIZE)]
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=hidden).sample
        feats_ref = run_until(unet, unet.up_blocks[1], x, t, encoder_hidden_states=hidden)
        with capture_cross_attention(unet, all_cross):
            out = unet(x, t, encoder_hidden_states=hidden).sample
            feats = run_until(unet, unet.up_blocks[1], x, t, encoder_hidden_states=hidden)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats, feats_ref, atol=1e-5, rtol=1e-4)


def test_gradients_reach_the_embedding(sd: sdm.StableDiffusion) -> None:
    x, t, _ = unet_inputs(batch=1)
    emb = torch.randn(1, 77, 32, requires_grad=True)
    names = hedlin_layers(sd, SIZE)
    stop = sd.unet.get_submodule(names[-1].removesuffix(".processor"))
    with capture_cross_attention(sd.unet, names) as store:
        run_until(sd.unet, stop, x, t, encoder_hidden_states=emb)
        store.maps(token=1)[:, 0, 0, 0].sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert emb.grad[0, 1].abs().sum() > 0  # the read-out token itself


# ---- geometry -------------------------------------------------------------------------------------------------
def test_crop_and_paste_geometry() -> None:
    img = torch.rand(1, 3, 33, 33)
    full = crop_images(img, torch.zeros(1, 2), 1.0)
    torch.testing.assert_close(full, img, atol=1e-5, rtol=0)
    # A crop of half the side at offset (0.5, 0): its corner pixel (0, 0) shows image pixel (x=16, y=0).
    crop = crop_images(img, torch.tensor([[0.5, 0.0]]), 0.5)
    torch.testing.assert_close(crop[0, :, 0, 0], img[0, :, 0, 16])
    torch.testing.assert_close(crop[0, :, 32, 32], img[0, :, 16, 32])
    # Pasting a crop-frame Gaussian puts it back at the right image position, zero outside the crop.
    g = gaussian_maps(torch.tensor([[16.0, 16.0]]), (33, 33), 2.0)  # crop centre
    pasted, inside = paste_maps(g, torch.tensor([[0.5, 0.0]]), 0.5)
    assert tuple(sdm.matching.argmax_2d(pasted)[0].tolist()) == (24.0, 8.0)
    assert inside[0, 0, 0] == 0 and inside[0, 0, 16] == 1 and inside[0, 16, 32] == 1 and inside[0, 17, 32] == 0


def test_peaks_map_to_original_pixels(sd: sdm.StableDiffusion) -> None:
    maps = gaussian_maps(torch.tensor([[63.0, 0.0], [21.0, 42.0]]), (SIZE, SIZE), 1.0)
    # the authors': argmax pixel + 0.5 on the 64 x 64 input (utils/optimize.py:79-82), then to a 100 x 200 (H x W)
    # original per axis: x = x' * W / 64, y = y' * H / 64
    m = AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE, progress=False))
    want = torch.tensor([[63.5 * 200 / 64, 0.5 * 100 / 64], [21.5 * 200 / 64, 42.5 * 100 / 64]])
    torch.testing.assert_close(m.peaks(maps, (100, 200)), want)
    # geometry "continuous" (sdm 0.2): align corners, cell c of 64 is the resized pixel c
    m = AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE, progress=False, geometry="continuous"))
    torch.testing.assert_close(m.peaks(maps, (100, 200)), torch.tensor([[63 * 200 / 64, 0.0], [21 * 200 / 64, 42 * 100 / 64]]))


# ---- the matcher ----------------------------------------------------------------------------------------------
def test_crop_centres_are_the_resized_pixels_exactly(sd: sdm.StableDiffusion) -> None:
    """The authors centre the optimisation crops on `src_kps / 512 * 512`, the resized pixel itself
    (utils/optimize.py:52, utils/optimize_token.py:568): every integer point of an image already at the input size stays that
    integer (a round trip through x / (W' - 1) would give 17.9999981 for 18 at 128 px, and `int()` in the crop
    bounds would then move a crop range by a pixel). Points of another image size scale by W'/W."""
    m = AttentionMatcher(sd, AttentionMatcherConfig(image_size=128, progress=False))
    grid = torch.stack(torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij"), dim=-1).reshape(-1, 2)
    assert torch.equal(m._points(grid, (128, 128)), grid)
    assert m._points([[18.0, 18.0]], (128, 128)).tolist() == [[18.0, 18.0]]
    assert m._points([[10.0, 30.0]], (256, 64)).tolist() == [[20.0, 15.0]]  # x' = x * 128 / 64, y' = y * 128 / 256


def test_optimisation_lowers_the_loss_and_self_match(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    m = AttentionMatcher(sd, quick_config(sd))
    res = m.optimize_embeddings(image, POINTS)
    assert res.embeddings.shape == (4, 2, 77, 32) and res.losses.shape == (30, 4, 2)
    first, last = res.losses[:3].mean(), res.losses[-3:].mean()
    assert last < 0.92 * first, (first, last)  # measured 0.73-0.86 over seeds 0-4
    maps = m.attention_maps(image, res.embeddings)
    assert maps.shape == (4, SIZE, SIZE) and torch.isfinite(maps).all()
    err = (m.peaks(maps, (SIZE, SIZE)) - POINTS).norm(dim=-1)
    assert err.mean() < 8.0, err  # measured 3.0-4.6 px mean over seeds 0-4 (random guess ~25 px)


def test_match_is_deterministic_and_takes_pil(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    cfg = quick_config(sd, layers=None, steps=3, num_embeddings=1, inference_crops=3, seed=7)
    m = AttentionMatcher(sd, cfg)
    trg = image.flip(-1)[:, :, :48]  # a different size: 48 wide, 64 high
    a = m.match(image, trg, POINTS)
    b = m.match(image, trg, POINTS)
    assert a.shape == (4, 2) and torch.equal(a, b)
    assert (a[:, 0] >= 0).all() and (a[:, 0] <= 47).all() and (a[:, 1] >= 0).all() and (a[:, 1] <= 63).all()
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    assert m.match(pil, pil, POINTS[:1]).shape == (1, 2)
    m.config.peak = "soft_argmax"
    assert m.match(image, trg, POINTS[:2]).shape == (2, 2)


def test_bad_input_errors(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    m = AttentionMatcher(sd, quick_config(sd, steps=1, num_embeddings=1, inference_crops=1))
    with pytest.raises(ValueError, match="outside"):
        m.match(image, image, torch.tensor([[64.0, 3.0]]))
    with pytest.raises(ValueError, match="no points"):
        m.match(image, image, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="N x 2"):
        m.match(image, image, torch.zeros(3))
    with pytest.raises(ValueError, match="3 x H x W"):
        m.match(image[:2], image, POINTS)
    with pytest.raises(ValueError, match="3 x H x W"):
        m.match(image, torch.stack([image, image]), POINTS)
    with pytest.raises(ValueError, match="embeddings"):
        m.attention_maps(image, torch.zeros(2, 77, 16))
    with pytest.raises(ValueError, match="crop_frac"):
        AttentionMatcherConfig(crop_frac=1.5)
    with pytest.raises(ValueError, match="opt_timestep"):
        AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE, opt_timestep=1000))
    with pytest.raises(ValueError, match="cross-attention"):
        AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE, layers=("mid_block.attentions.0.attn1.processor",)))


# ---- the authors' computation (ubc-vision/LDM_correspondences 97e3246) -------------------------------------------
def test_noise_is_the_authors_uniform_draw(sd: sdm.StableDiffusion) -> None:
    """optimize_token.py:589-591: add_noise(latent, torch.rand_like(latent), t), i.e. U[0, 1) noise."""
    latents = torch.randn(2, 4, 8, 8)
    matcher = AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE))
    noisy = matcher._noisy(latents, 140, torch.Generator().manual_seed(5))
    u = torch.rand(latents.shape, generator=torch.Generator().manual_seed(5))
    ab = sd.scheduler.alphas_cumprod[140]
    torch.testing.assert_close(noisy, ab.sqrt() * latents + (1 - ab).sqrt() * u)
    gauss = AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE, noise="gaussian"))._noisy(latents, 140, torch.Generator().manual_seed(5))
    z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(gauss, ab.sqrt() * latents + (1 - ab).sqrt() * z)


def test_heads_default_to_the_upper_half(sd: sdm.StableDiffusion) -> None:
    """optimize_token.py:81-84 keeps attn[h // 2:] of each layer, 348-350 averages those heads."""
    layers = fine_layers(sd)
    with capture_cross_attention(sd.unet, layers) as store, torch.no_grad():
        run_until(sd.unet, dict(sd.unet.named_modules())[layers[-1].removesuffix(".processor")], torch.randn(1, 4, 8, 8),
                  torch.tensor([40]), encoder_hidden_states=torch.randn(1, 77, sd.embed_dim))
        default = store.layer_maps(1, None, "upper-half")
        by_hand = []
        for name in layers:
            probs = store.probs[name]
            h, w = store.resolutions[name]
            heads = probs.shape[1]
            by_hand.append(probs[:, heads // 2 :, :, 1].mean(dim=1).reshape(1, h, w))
        torch.testing.assert_close(default[:, :, 0], torch.stack(by_hand, dim=1))
        assert AttentionMatcherConfig().heads == "upper-half"
        assert not torch.allclose(store.maps(1, None, "all"), store.maps(1, None, "upper-half"))


def test_default_path_lowers_its_per_layer_loss(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    """The defaults (hedlin layers, upper-half heads, per-layer MSE, uniform noise) lower the loss they define;
    the recorded loss is the mean over layers of each layer's MSE (optimize_token.py:606-621)."""
    cfg = AttentionMatcherConfig(image_size=SIZE, steps=25, lr=0.3, num_embeddings=1, progress=False)
    matcher = AttentionMatcher(sd, cfg)
    assert set(matcher.layers) == set(hedlin_layers(sd, SIZE))
    losses = matcher.optimize_embeddings(image, POINTS[:2]).losses.mean(dim=(1, 2))
    # measured on tiny models of seeds 0-3 (its hedlin layers are 2 x 2 and 4 x 4 maps): ratio 0.92-0.94
    assert losses[-5:].mean() < 0.97 * losses[:5].mean()


@pytest.mark.parametrize("steps", [1, 2])  # 1: the last step's check runs after the loop; 2: during the next step
def test_non_finite_maps_raise(sd: sdm.StableDiffusion, image: torch.Tensor, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    cfg = AttentionMatcherConfig(image_size=SIZE, steps=steps, num_embeddings=1, inference_crops=2, progress=False)
    matcher = AttentionMatcher(sd, cfg)
    real = AttentionStore.native_maps

    def nan_maps(self, *args, **kwargs):
        return [m * float("nan") for m in real(self, *args, **kwargs)]

    monkeypatch.setattr(AttentionStore, "native_maps", nan_maps)
    with pytest.raises(FloatingPointError, match="step 1"):
        matcher.optimize_embeddings(image, POINTS[:1])
    with pytest.raises(FloatingPointError, match="non-finite attention maps"):
        matcher.attention_maps(image, torch.zeros(1, 1, 77, sd.embed_dim))


@pytest.mark.parametrize("align_corners", [False, True])
def test_native_resolution_loss_equals_the_upsampled_one(align_corners: bool) -> None:
    """upsampled_mse: the MSE of a bilinearly upsampled map against a Gaussian, computed at the map's resolution,
    equals upsampling with F.interpolate and averaging over the big grid (values and gradients)."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 16, 12, generator=g, dtype=torch.float64).requires_grad_()
    centers = torch.tensor([[10.0, 20.0], [0.0, 63.5], [47.0, 5.0]], dtype=torch.float64)
    size, sigma = (64, 48), 7.0
    xs, ys = torch.arange(48, dtype=torch.float64), torch.arange(64, dtype=torch.float64)
    target = torch.exp(-((xs.view(1, 1, -1) - centers[:, 0, None, None]) ** 2 + (ys.view(1, -1, 1) - centers[:, 1, None, None]) ** 2) / (2 * sigma**2))
    big = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=align_corners)[:, 0]
    expected = ((big - target) ** 2).mean(dim=(1, 2))
    (grad_expected,) = torch.autograd.grad(expected.sum(), maps)

    g_y, g_x = gaussian_profiles(centers, size, sigma)
    got = upsampled_mse(maps, g_y.double(), g_x.double(), align_corners)
    (grad_got,) = torch.autograd.grad(got.sum(), maps)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-6, atol=1e-9)


def test_native_loss_resolution_gives_the_optimisation_of_the_map_resolution(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    """loss_resolution "native" (default) and "map" (upsample first, as the authors' code) optimise the same function."""
    runs = {}
    for where in ("native", "map"):
        cfg = AttentionMatcherConfig(image_size=SIZE, steps=4, num_embeddings=2, progress=False, loss_resolution=where)
        runs[where] = AttentionMatcher(sd, cfg).optimize_embeddings(image, POINTS[:2])
    torch.testing.assert_close(runs["native"].losses, runs["map"].losses, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(runs["native"].embeddings, runs["map"].embeddings, rtol=1e-4, atol=1e-5)


def test_models_it_was_not_tuned_for_are_warned_about() -> None:
    sd = sdm.tiny_stable_diffusion(seed=0)
    sd.random_weights = False  # as if these were real weights of a model that is not SD 1.x (text width 32)
    with pytest.warns(UserWarning, match="CompVis/stable-diffusion-v1-4"):
        AttentionMatcher(sd, AttentionMatcherConfig(image_size=SIZE))


def test_margin_crops_follow_the_authors_rule() -> None:
    """crop_image (optimize_token.py:474-502) at their 93.165 %: 477 px crops of 512, safe margin int(477 * 0.15)
    = 71 px, offsets drawn in [clamp(v - 477 + 71), clamp(v - 71)] with clamp to [0, 512 - 477]."""
    from sdm.attention import crop_side, margin_crop_offsets

    frac = 0.9316549294381423
    assert crop_side((512, 512), frac) == (477, 477)
    gen = torch.Generator().manual_seed(0)
    corners = torch.tensor([[0.0, 0.0], [0.0, 512.0], [512.0, 0.0], [512.0, 512.0]])
    assert margin_crop_offsets(corners, (512, 512), frac, 0.15, gen).tolist() == [[0, 0], [0, 35], [35, 0], [35, 35]]
    draws = margin_crop_offsets(torch.tensor([[256.0, 100.0]] * 400), (512, 512), frac, 0.15, gen)
    assert set(draws[:, 0].tolist()) == set(range(0, 36))  # x: [max(0, 256 - 406), min(185, 35)] = [0, 35]
    assert set(draws[:, 1].tolist()) == set(range(0, 30))  # y: [0, min(100 - 71, 35)] = [0, 29]


def test_margin_offsets_draw_what_the_authors_randint_draws() -> None:
    """crop_image's draw (optimize_token.py:474-502), written out here as the code has it: per point, x then y, the
    bounds from the point as floats, then torch.randint(int(lo), int(hi) + 1) from the generator. sdm reads the
    generator's words once (`generator_words`) and computes lo + word % range where the points are: the same
    offsets, the generator left in the same state, for points anywhere (fractional, on the borders, outside)."""
    from sdm.attention import crop_side, margin_crop_offsets
    from sdm.attention.geometry import generator_words, margin_offsets

    def authors(points: torch.Tensor, size: int, frac: float, margin: float, gen: torch.Generator) -> list[list[int]]:
        c = crop_side((size, size), frac)[0]
        safe, out = int(c * margin), []
        for x, y in points.tolist():
            row = []
            for v in (x, y):
                lo = min(max(0, v - c + safe), size - c)
                hi = min(max(0, v - safe), size - c)
                row.append(int(torch.randint(int(lo), int(hi) + 1, (1,), generator=gen)))
            out.append(row)
        return out

    g = torch.Generator().manual_seed(5)
    for size, frac in ((512, 0.9316549294381423), (64, 0.5), (300, 0.2)):
        points = torch.cat([torch.rand(40, 2, generator=g) * size * 1.2 - 0.1 * size, torch.tensor([[0.0, float(size)], [17.5, 3.25]])])
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        mine, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert margin_crop_offsets(points, (size, size), frac, 0.15, mine).tolist() == authors(points, size, frac, 0.15, theirs)
        assert torch.equal(mine.get_state(), theirs.get_state())
    # the words themselves: what torch.randint turns into numbers below 2**28
    state = g.get_state()
    words = generator_words(1000, g)
    g.set_state(state)
    assert torch.equal(torch.randint(0, 2**27, (1000,), generator=g), words % 2**27)
    assert words.min() >= 0 and words.max() < 2**32 and (words >= 2**27).any()
    # computed where the points are: float32 points (the device's argmax + 0.5) give the double path's offsets
    pts = torch.tensor([[100.5, 411.5], [405.5, 0.5]])
    w = torch.tensor([[7, 2**31 + 5], [2**32 - 1, 0]])
    # c = 477, safe = 71. Point 1, x: [0, int(29.5)] -> 0 + 7 % 30; y: [int(5.5), 35] -> 5 + (2**31 + 5) % 31 = 5 + 7
    # (2**5 = 1 mod 31). Point 2, x: [0, 35] -> (2**32 - 1) % 36 = 3 (2**32 = 4 mod 36); y: [0, 0] -> 0
    assert margin_offsets(pts, (512, 512), 0.9316549294381423, 0.15, w).tolist() == [[7, 12], [3, 0]]


def test_windows_are_added_as_slices_add_them() -> None:
    """optimize_token.py:302-305: the crop's maps added where the crop lies, and 1 to its count."""
    from sdm.attention.geometry import add_windows

    g = torch.Generator().manual_seed(0)
    sums, counts = torch.rand(3, 2, 9, 11, generator=g), torch.zeros(3, 1, 9, 11)
    maps, offsets = torch.rand(2, 2, 4, 5, generator=g), torch.tensor([[6, 5], [0, 2]])  # (x0, y0); rows 1 and 2
    want_sums, want_counts = sums.clone(), counts.clone()
    for i, (x0, y0) in enumerate(offsets.tolist()):
        want_sums[1 + i, :, y0 : y0 + 4, x0 : x0 + 5] += maps[i]
        want_counts[1 + i, :, y0 : y0 + 4, x0 : x0 + 5] += 1
    add_windows(sums[1:3], counts[1:3], maps, offsets)
    assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts)


def test_crops_are_cut_at_integer_offsets_and_resized_without_align_corners() -> None:
    from sdm.attention import cut_crops

    ramp = torch.arange(64.0).view(1, 1, 1, 64).expand(1, 3, 64, 64)  # value = x
    out = cut_crops(ramp, torch.tensor([[10, 3]]), (32, 32))
    # bilinear, align_corners=False: output pixel j samples the crop at (j + 0.5) * 32 / 64 - 0.5 (edge-clamped)
    j = torch.arange(64.0)
    want = 10 + ((j + 0.5) * 32 / 64 - 0.5).clamp(0, 31)
    torch.testing.assert_close(out[0, 0, 5], want)


def test_readout_is_a_softmax_per_layer_then_the_mean() -> None:
    """utils/optimize.py:69-82: per layer softmax over the pixels, mean over layers, argmax."""
    from sdm.attention import layer_softmax_readout

    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 1] = 0.9  # layer 0: one peak on a zero background
    maps[0, 1] = 0.5  # layer 1: a high background, its peak elsewhere, zero where layer 0 peaks
    maps[0, 1, 2, 3], maps[0, 1, 1, 1] = 1.0, 0.0
    out = layer_softmax_readout(maps)
    z0 = 15 + torch.exp(torch.tensor(0.9))
    l0 = torch.full((4, 4), 1 / z0)
    l0[1, 1] = torch.exp(torch.tensor(0.9)) / z0
    z1 = 14 * torch.exp(torch.tensor(0.5)) + torch.exp(torch.tensor(1.0)) + 1
    l1 = torch.full((4, 4), float(torch.exp(torch.tensor(0.5)) / z1))
    l1[2, 3], l1[1, 1] = torch.exp(torch.tensor(1.0)) / z1, 1 / z1
    torch.testing.assert_close(out[0], (l0 + l1) / 2)
    assert int(out[0].argmax()) == 1 * 4 + 1  # the authors' read-out picks layer 0's peak ...
    assert int(maps[0].mean(dim=0).argmax()) == 2 * 4 + 3  # ... where the mean of the raw maps picks layer 1's


def test_authors_inference_starts_with_the_corner_crops(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    """With 4 crops only the corner crops run (optimize_token.py:259-268): together they cover the image."""
    cfg = AttentionMatcherConfig(image_size=SIZE, inference_crops=4, num_embeddings=1, progress=False, readout="mean-map")
    matcher = AttentionMatcher(sd, cfg)
    maps = matcher.attention_maps(image, torch.randn(2, 1, 77, sd.embed_dim))
    assert maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all() and (maps > 0).all()


def test_authors_inference_pastes_each_crop_and_recentres_on_the_running_argmax(
    sd: sdm.StableDiffusion, image: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inference of optimize_token.py:256-310, recomputed here with slices: the four corner crops, then crops
    around the argmax (+ 0.5 px) of the mean over layers of the maps so far; each crop's maps added where the crop
    lies and the per-pixel mean over the crops covering it. The UNet's maps are replaced by recorded random ones."""
    import sdm.attention.crops as crops_module

    cfg = AttentionMatcherConfig(image_size=SIZE, inference_crops=7, num_embeddings=1, progress=False, readout="mean-map", max_batch=2)
    matcher = AttentionMatcher(sd, cfg)
    layers, draws, maps_given = len(matcher.layers), [], []
    real_offsets = crops_module.margin_offsets
    g = torch.Generator().manual_seed(3)

    def recorded_offsets(locs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = real_offsets(locs, *args, **kwargs)
        draws.append((locs.clone(), out.clone()))
        return out

    def fake_maps(noisy: torch.Tensor, hidden: torch.Tensor, timestep: int, store, per_layer: bool = False, size=None) -> torch.Tensor:
        maps_given.append(torch.rand(noisy.shape[0], layers, *size, generator=g))
        return maps_given[-1]

    monkeypatch.setattr(crops_module, "margin_offsets", recorded_offsets)
    monkeypatch.setattr(matcher, "_unet_maps", fake_maps)
    n = 3
    out = matcher.attention_maps(image, torch.randn(n, 1, 77, sd.embed_dim))
    side = int(SIZE * cfg.crop_frac)
    sums, counts = torch.zeros(n, layers, SIZE, SIZE), torch.zeros(n, 1, SIZE, SIZE)
    corners = [(0.0, 0.0), (0.0, float(SIZE)), (float(SIZE), 0.0), (float(SIZE), float(SIZE))]
    per_crop = [torch.cat(maps_given[k : k + 2]) for k in range(0, len(maps_given), 2)]  # micro-batches of 2 and 1
    assert len(draws) == len(per_crop) == 7
    for k, ((locs, offsets), maps) in enumerate(zip(draws, per_crop)):
        for i in range(n):
            if k < 4:
                assert locs[i].tolist() == list(corners[k])
            else:
                running = (sums[i] / counts[i]).nan_to_num().mean(dim=0)
                flat = int(running.flatten().argmax())
                assert locs[i].tolist() == [flat % SIZE + 0.5, flat // SIZE + 0.5]
            x0, y0 = offsets[i].tolist()
            sums[i, :, y0 : y0 + side, x0 : x0 + side] += maps[i]
            counts[i, :, y0 : y0 + side, x0 : x0 + side] += 1
    torch.testing.assert_close(out, (sums / counts.clamp_min(1)).mean(dim=1), rtol=0, atol=0)


def test_predictor_optimises_a_shared_source_once(sd: sdm.StableDiffusion, image: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs that share a source (id and points) reuse its embeddings, with the answer `match` gives."""
    from sdm.data import Pair, collate_pairs
    from sdm.predictors import attention_predictor

    cfg = AttentionMatcherConfig(image_size=SIZE, steps=3, num_embeddings=1, inference_crops=5, progress=False)
    matcher = AttentionMatcher(sd, cfg)
    targets = [image.flip(-1), image.flip(-2)]
    pts = POINTS[:2]

    def pair(i: int, trg: torch.Tensor) -> Pair:
        return Pair(image, trg, pts, pts, 2, "x", 10.0, "src", f"t{i}", (SIZE, SIZE), (SIZE, SIZE), f"p{i}")

    calls = {"n": 0}
    real = AttentionMatcher.optimize_embeddings

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AttentionMatcher, "optimize_embeddings", counted)
    out = attention_predictor(matcher)(collate_pairs([pair(i, t) for i, t in enumerate(targets)]))
    assert calls["n"] == 1
    for i, t in enumerate(targets):
        torch.testing.assert_close(out[i], matcher.match(image, t, pts), rtol=0, atol=0)


def test_per_pair_optimisation_draws_afresh_for_each_pair(sd: sdm.StableDiffusion, image: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize_per "pair" (the authors' loop): each pair optimises its source again, with draws seeded by the
    config's seed and its pair id, so two pairs of one source get different embeddings, and a rerun the same."""
    from sdm.data import Pair, collate_pairs
    from sdm.draws import derived_seed
    from sdm.predictors import attention_predictor

    cfg = AttentionMatcherConfig(image_size=SIZE, steps=2, num_embeddings=1, inference_crops=2, progress=False, optimize_per="pair")
    matcher = AttentionMatcher(sd, cfg)
    pts = POINTS[:2]
    batch = collate_pairs([Pair(image, image.flip(-1), pts, pts, 2, "x", 10.0, "src", "t", (SIZE, SIZE), (SIZE, SIZE), f"p{i}") for i in range(2)])
    seeds: list[int | None] = []
    real = AttentionMatcher.optimize_embeddings
    monkeypatch.setattr(AttentionMatcher, "optimize_embeddings", lambda self, *a, seed=None: seeds.append(seed) or real(self, *a, seed=seed))
    first = attention_predictor(matcher)(batch)
    assert seeds == [derived_seed(0, "optimize", "p0"), derived_seed(0, "optimize", "p1")]
    torch.testing.assert_close(attention_predictor(matcher)(batch), first, rtol=0, atol=0)
    a, b = (real(matcher, image, pts, seed=s).embeddings for s in seeds[:2])
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="optimize_per"):
        AttentionMatcherConfig(optimize_per="image")  # type: ignore[arg-type]


def test_stored_crops_carry_no_autograd_graph(sd: sdm.StableDiffusion, image: torch.Tensor) -> None:
    """The crop store keeps an image's latents across calls: they hold no autograd graph, even when the VAE's
    weights require gradients (a user fine-tuning it)."""
    sd.vae.requires_grad_(True)
    try:
        matcher = AttentionMatcher(sd, quick_config(sd, steps=1, inference_crops=1))
        matcher.optimize_embeddings(image, POINTS[:1])
        grid = next(iter(matcher.crop_store._items.values()))
        assert not grid.requires_grad
    finally:
        sd.vae.requires_grad_(False)


def test_crop_store_encodes_each_image_once_as_each_crop_alone(sd: sdm.StableDiffusion, image: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `crop_store`, every integer-offset crop of an image is encoded once (by content) and shared by the source's
    optimisation and any later call; each stored latent is the crop's own VAE mean (the crop cut by hand here) and the
    matches equal those of encoding only the drawn crops, per call (crop_store=0)."""
    cfg = quick_config(sd, steps=4, inference_crops=5)
    matcher = AttentionMatcher(sd, cfg)
    encoded = []
    real = AttentionMatcher._encode

    def counted(self, pixels):
        encoded.append(pixels.shape[0])
        return real(self, pixels)

    monkeypatch.setattr(AttentionMatcher, "_encode", counted)
    side = int(SIZE * cfg.crop_frac)  # 59 px: offsets 0..5 on each axis
    emb = matcher.optimize_embeddings(image, POINTS).embeddings
    assert sum(encoded) == (SIZE - side + 1) ** 2 == 36
    matches = matcher.transfer(image, emb)  # the same image as target: nothing new to encode
    other = image.flip(-1)
    matcher.transfer(other, emb)
    assert sum(encoded) == 72 and len(matcher.crop_store) == 2

    grid = next(iter(matcher.crop_store._items.values()))
    x0, y0 = 5, 2
    pixels = image[None] * 2 - 1  # already 64 px: the matcher only rescales to [-1, 1]
    crop = F.interpolate(pixels[:, :, y0 : y0 + side, x0 : x0 + side], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    alone = sd.vae.encode(crop).latent_dist.mean * sd.vae.config.scaling_factor
    torch.testing.assert_close(grid[y0, x0], alone[0], rtol=1e-5, atol=1e-5)

    lazy = AttentionMatcher(sd, quick_config(sd, steps=4, inference_crops=5, crop_store=0))
    torch.testing.assert_close(lazy.match(image, image, POINTS), matches, rtol=0, atol=0)
    with pytest.raises(ValueError, match="crop_store"):
        AttentionMatcherConfig(crop_store=-1)
