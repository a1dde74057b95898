"""sdm.inversion: deterministic DDIM inversion."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

import sdm
from sdm.data import SyntheticPairs
from sdm.evaluate import evaluate
from sdm.extractors import ImageBatch
from sdm.inversion import InversionExtractor, ddim_invert, inversion_timesteps, inverted_features
from sdm.prompts import build_prompt


def test_ddim_add_noise_is_ddpm_add_noise() -> None:
    """Why notebook 05 compares inversion, not DDIM noising: the two schedulers noise identically."""
    assert inspect.getsource(DDIMScheduler.add_noise) == inspect.getsource(DDPMScheduler.add_noise)


def test_inversion_timesteps() -> None:
    assert inversion_timesteps(261, 3) == [0, 87, 174, 261]
    assert inversion_timesteps(2, 5) == [0, 1, 2]
    assert inversion_timesteps(0, 4) == [0]
    with pytest.raises(ValueError):
        inversion_timesteps(10, 0)


class OracleUNet(nn.Module):
    """Predicts the exact noise (as epsilon, v or sample) of x = sqrt(abar) x0 + sqrt(1 - abar) eps for fixed
    x0 and eps: DDIM inversion must then land exactly on the closed-form noising at every timestep."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, alphas: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.x0, self.eps, self.alphas, self.prediction = x0, eps, alphas, prediction
        self.anchor = nn.Parameter(torch.zeros(1))
        self.up_blocks = nn.ModuleList([nn.Identity() for _ in range(4)])
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        a = self.alphas[t[0]]
        out = {"epsilon": self.eps, "v_prediction": a.sqrt() * self.eps - (1 - a).sqrt() * self.x0, "sample": self.x0}
        return SimpleNamespace(sample=out[self.prediction])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_inversion_with_an_exact_model_matches_closed_form_noising(prediction: str) -> None:
    sd = sdm.tiny_stable_diffusion()
    sd.scheduler = DDPMScheduler(**{**dict(sd.scheduler.config), "prediction_type": prediction})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sd.unet = OracleUNet(x0, eps, sd.scheduler.alphas_cumprod, prediction)
    featurizer = sdm.SDFeaturizer(sd, image_size=64, timestep=261)
    start = sd.scheduler.add_noise(x0, eps, torch.tensor([0]))  # the input is x at s_0 = 0
    inverted = ddim_invert(featurizer, start, "", steps=4)
    assert sd.unet.calls == 4
    expected = sd.scheduler.add_noise(x0, eps, torch.tensor([261]))
    assert torch.allclose(inverted, expected, atol=1e-4)


def test_inversion_is_deterministic_and_differs_from_ddpm_noise() -> None:
    sd = sdm.tiny_stable_diffusion()
    featurizer = sdm.SDFeaturizer(sd, image_size=64, timestep=200)
    pair = SyntheticPairs(n=1, image_size=64, n_kps=4)[0]
    latents = featurizer.encode_images(torch.stack([pair.src_image, pair.trg_image]))
    a = ddim_invert(featurizer, latents, "", steps=3)
    b = ddim_invert(featurizer, latents, [""], steps=3)
    assert a.shape == latents.shape and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a, featurizer.add_noise(latents))
    assert torch.allclose(ddim_invert(featurizer, latents, "", timestep=0), latents)
    feats = inverted_features(featurizer, latents, "", steps=2)
    assert feats.shape == featurizer(torch.stack([pair.src_image, pair.trg_image]), "").shape
    with pytest.raises(ValueError, match="timestep"):
        ddim_invert(featurizer, latents, "", timestep=1000)


def test_inversion_extractor_evaluates() -> None:
    sd = sdm.tiny_stable_diffusion()
    featurizer = sdm.SDFeaturizer(sd, image_size=64, timestep=100)
    extractor = InversionExtractor(featurizer, build_prompt("empty", featurizer), steps=2)
    ds = SyntheticPairs(n=2, image_size=64, n_kps=4)
    table = evaluate(extractor, ds, progress=False).table
    assert 0 <= table.loc["all", "per_image@0.1"] <= 100
    pair = ds[0]
    s, _ = extractor.pair_features(ImageBatch(pair.src_image[None], ["x"], ["a"]), ImageBatch(pair.trg_image[None], ["x"], ["b"]))
    assert torch.allclose(s, extractor.image_features(ImageBatch(pair.src_image[None], ["x"], ["a"])))
