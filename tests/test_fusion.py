"""sdm.fusion: SD+DINO-style fused features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdm
from sdm.data import SyntheticPairs
from sdm.encoders import tiny_dinov2
from sdm.evaluate import SDExtractor, ViTFeatures, evaluate
from sdm.fusion import FusedExtractor, fuse_features
from sdm.prompts import build_prompt


def test_fuse_features_normalises_resizes_and_weights() -> None:
    a = torch.randn(2, 5, 4, 4) * 10
    b = torch.randn(2, 3, 8, 8)
    fused = fuse_features([a, b], weights=(1.0, 0.5))
    assert fused.shape == (2, 8, 8, 8)  # the larger grid
    assert torch.allclose(fused[:, :5].norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    assert torch.allclose(fused[:, 5:].norm(dim=1), torch.full((2, 8, 8), 0.5), atol=1e-5)
    # b was already on the grid: its part is b normalised (times its weight)
    assert torch.allclose(fused[:, 5:], 0.5 * nn.functional.normalize(b, dim=1), atol=1e-6)
    # align corners: the corner cells of the resized map are a's corner cells
    assert torch.allclose(fused[:, :5, 0, 0], nn.functional.normalize(a, dim=1)[:, :, 0, 0], atol=1e-5)
    assert torch.allclose(fused[:, :5, -1, -1], nn.functional.normalize(a, dim=1)[:, :, -1, -1], atol=1e-5)
    assert fuse_features([a, b], grid=(4, 4)).shape == (2, 8, 4, 4)


def test_fuse_features_cosine_is_mean_of_cosines() -> None:
    a1, a2 = torch.randn(1, 6, 3, 3), torch.randn(1, 6, 3, 3)
    b1, b2 = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    f1, f2 = fuse_features([a1, b1]), fuse_features([a2, b2])
    cos = nn.functional.cosine_similarity
    assert torch.allclose(cos(f1, f2, dim=1), (cos(a1, a2, dim=1) + cos(b1, b2, dim=1)) / 2, atol=1e-5)


def test_fuse_features_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no feature maps"):
        fuse_features([])
    with pytest.raises(ValueError, match="weights"):
        fuse_features([torch.randn(1, 2, 3, 3)], weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="one B"):
        fuse_features([torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)])


def test_fused_extractor_image_and_pair_features_and_evaluate() -> None:
    sd = sdm.tiny_stable_diffusion()
    featurizer = sdm.SDFeaturizer(sd, image_size=64)
    vit = ViTFeatures(tiny_dinov2(), image_size=112)  # 8 x 8 patches; SD gives 4 x 4 at 64 px
    fused = FusedExtractor(SDExtractor(featurizer, build_prompt("empty", featurizer)), vit)
    assert fused.conditioning == "fixed"
    ds = SyntheticPairs(n=2, image_size=64, n_kps=4)
    pair = ds[0]
    images = torch.stack([pair.src_image, pair.trg_image])
    feats = fused.image_features(images, ["a", "a"], [pair.src_id, pair.trg_id])
    c_sd = sd.unet.config.block_out_channels[-2]
    assert feats.shape == (2, c_sd + 32, 8, 8)
    s, t = fused.pair_features(images[:1], images[1:], ["a"], [pair.src_id], [pair.trg_id])
    assert torch.allclose(s, feats[:1], atol=1e-5) and torch.allclose(t, feats[1:], atol=1e-5)
    table = evaluate(fused, ds, progress=False).table
    assert 0 <= table.loc["all", "per_image@0.1"] <= 100
