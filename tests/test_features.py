"""sdm.features: the featurizer (latents, seeded noise, the stopped UNet, ensembles) and the assembly of learned
prompts."""

from __future__ import annotations

import pytest
import torch

import sdm
from sdm.features import SDFeaturizer, run_until


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
    from sdm.draws import content_keys

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

    from sdm.draws import keyed_normal

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
