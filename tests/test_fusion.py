"""sdm.fusion: SD+DINO-style fused features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sdm
from sdm.data import SyntheticPairs
from sdm.encoders import tiny_dinov2
from sdm.evaluate import evaluate
from sdm.extractors import ImageBatch, SDExtractor, ViTFeatures
from sdm.fusion import FusedExtractor, FusionConfig, fuse_features
from sdm.matching import MatchConfig
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


def _codes_fuse_dino(sd_feats: torch.Tensor, images: torch.Tensor, dino: nn.Module) -> torch.Tensor:
    """The SD4Match code's FUSE_DINO written out here (sd_feature_extractor.py:131-138): the VAE input
    (x * 2 - 1) resized like torchvision 0.14's TF.resize of a tensor (bilinear, no antialias) to 14h x 14w,
    patch tokens [:, 1:] as an h x w map, both L2-normalised with x / (|x| + 1e-6), weights 0.5 and 0.5."""
    b, _, h, w = sd_feats.shape
    x = nn.functional.interpolate(images * 2 - 1, size=(14 * h, 14 * w), mode="bilinear", align_corners=False)
    with torch.no_grad():
        tokens = dino(pixel_values=x).last_hidden_state[:, 1:, :]
    d = tokens.permute(0, 2, 1).reshape(b, -1, h, w)
    sd_feats = sd_feats / (torch.norm(sd_feats, dim=1, keepdim=True) + 1e-6)
    d = d / (torch.norm(d, dim=1, keepdim=True) + 1e-6)
    return torch.cat([0.5 * sd_feats, 0.5 * d], dim=1)


def test_default_fusion_is_the_codes_fuse_dino() -> None:
    sd = sdm.tiny_stable_diffusion()
    featurizer = sdm.SDFeaturizer(sd, image_size=64)
    sd_extractor = SDExtractor(featurizer, build_prompt("empty", featurizer))
    dino = tiny_dinov2()
    fused = FusedExtractor(sd_extractor, dino)
    assert fused.conditioning == "fixed" and fused.similarity == "dot" and fused.fusion.config == FusionConfig()
    ds = SyntheticPairs(n=2, image_size=64, n_kps=4)
    pair = ds[0]
    images = torch.stack([pair.src_image, pair.trg_image])
    ids = [pair.src_id, pair.trg_id]
    feats = fused.image_features(ImageBatch(images, ["a", "a"], ids))
    sd_feats = sd_extractor.image_features(ImageBatch(images, ["a", "a"], ids))
    assert sd_feats.shape[-2:] == (4, 4)  # the SD grid; DINOv2 then sees 56 x 56 pixels
    torch.testing.assert_close(feats, _codes_fuse_dino(sd_feats, images, dino), rtol=1e-5, atol=1e-6)
    s, t = fused.pair_features(ImageBatch(images[:1], ["a"], [pair.src_id]), ImageBatch(images[1:], ["a"], [pair.trg_id]))
    torch.testing.assert_close(torch.cat([s, t]), feats, rtol=1e-5, atol=1e-6)


def test_fused_features_are_scored_by_the_inner_product() -> None:
    """evaluate() takes the extractor's similarity: with the default fusion it equals an evaluation that passes
    "dot" explicitly, differs from "cosine" (fused vectors of norm 1/sqrt(2): the softmax sees half the cosine)
    and records it in the protocol."""
    sd = sdm.tiny_stable_diffusion()
    featurizer = sdm.SDFeaturizer(sd, image_size=64)
    fused = FusedExtractor(SDExtractor(featurizer, build_prompt("empty", featurizer)), tiny_dinov2())
    ds = SyntheticPairs(n=3, image_size=64, n_kps=6)
    own = evaluate(fused, ds, progress=False)
    dot = evaluate(fused, ds, progress=False, matcher=MatchConfig(similarity="dot"))
    cosine = evaluate(fused, ds, progress=False, matcher=MatchConfig(similarity="cosine"))
    pd.testing.assert_frame_equal(own.table, dot.table)
    assert own.info["protocol"]["matcher_params"]["similarity"] == "dot"
    assert own.info["protocol"]["fusion"]["weights"] == [0.5, 0.5]
    assert "similarity" not in cosine.info["protocol"]["matcher_params"]
    assert not np.allclose(own.records["dist"], cosine.records["dist"])  # the scoring changes the matches


def test_sdm_03_fusion_is_an_option() -> None:
    """FusionConfig(dino_input="imagenet", dino_size=112, grid="finer", weights=(1, 1), similarity="cosine"): DINOv2
    on ImageNet-normalised 112-px images (8 x 8 patches), the 4 x 4 SD map upsampled to 8 x 8, cosine scoring."""
    sd = sdm.tiny_stable_diffusion()
    featurizer = sdm.SDFeaturizer(sd, image_size=64)
    sd_extractor = SDExtractor(featurizer, build_prompt("empty", featurizer))
    dino = tiny_dinov2()
    config = FusionConfig(dino_input="imagenet", dino_size=112, grid="finer", weights=(1.0, 1.0), similarity="cosine")
    fused = FusedExtractor(sd_extractor, dino, config)
    ds = SyntheticPairs(n=2, image_size=64, n_kps=4)
    pair = ds[0]
    images = torch.stack([pair.src_image, pair.trg_image])
    feats = fused.image_features(ImageBatch(images, ["a", "a"], [pair.src_id, pair.trg_id]))
    c_sd = sd.unet.config.block_out_channels[-2]
    assert feats.shape == (2, c_sd + 32, 8, 8) and fused.similarity == "cosine"
    x = nn.functional.interpolate(images, size=(112, 112), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = dino(pixel_values=(x - mean) / std).last_hidden_state[:, 1:, :]
    d = tokens.permute(0, 2, 1).reshape(2, -1, 8, 8)
    torch.testing.assert_close(feats[:, c_sd:], nn.functional.normalize(d, dim=1), rtol=1e-4, atol=1e-5)
    table = evaluate(fused, ds, progress=False).table
    assert 0 <= table.loc["all", "per_image@0.1"] <= 100


def test_fusion_bad_settings() -> None:
    with pytest.raises(ValueError, match="fusion grid"):
        FusionConfig(grid="coarse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="similarity"):
        FusionConfig(similarity="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        FusedExtractor(object(), tiny_dinov2(), FusionConfig(dino_size=100))
    with pytest.raises(TypeError, match="DINOv2 model itself"):
        FusedExtractor(object(), ViTFeatures(tiny_dinov2()))
