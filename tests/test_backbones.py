"""Backbones: a prompt trained on SD features fused with DINOv2 ("sd+dino"), scored on the same features."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SUBPROCESS_TIMEOUT

import sdm
from sdm.backbones import BACKBONES, build_backbone
from sdm.data import SyntheticPairs
from sdm.encoders import PromptEncoders, tiny_dinov2
from sdm.evaluate import evaluate
from sdm.extractors import SDExtractor
from sdm.fusion import FusedExtractor
from sdm.prompt_files import load_prompt, read_metadata
from sdm.train import TrainConfig, train

SIZE = 64


def test_fused_inner_product_is_a_quarter_of_the_two_cosines() -> None:
    """With the code's weights (0.5, 0.5) on one grid, the inner product of two fused vectors (how the code scores
    them) is (cos_SD + cos_DINO) / 4: computed here from the two models' features directly."""
    dino = tiny_dinov2(0)
    backbone = build_backbone("sd+dino", PromptEncoders(dino=dino), image_size=56)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 56, 56, generator=g)
    sd_feats = torch.randn(2, 8, 4, 4, generator=g)
    fused = backbone.features(sd_feats, images)
    assert fused.shape == (2, 8 + 32, 4, 4)  # the SD grid: DINOv2 saw 56 x 56 pixels
    dino_feats = backbone.fusion.dino_features(images, (4, 4))
    a, b = (0, slice(None), 1, 2), (1, slice(None), 3, 0)  # (image, channels, y, x) of two locations
    cos = F.cosine_similarity
    expected = (cos(sd_feats[a], sd_feats[b], dim=0) + cos(dino_feats[a], dino_feats[b], dim=0)) / 4
    torch.testing.assert_close(fused[a] @ fused[b], expected, rtol=1e-5, atol=1e-6)


def test_a_prompt_trains_on_fused_features_and_is_scored_on_them(tmp_path: Path) -> None:
    """train(backbone="sd+dino"): gradients reach the prompt through the SD half, validation and evaluation use
    the fused features, and the saved prompt records its backbone."""
    data = SyntheticPairs(n=4, image_size=SIZE, seed=4)
    cfg = TrainConfig(
        prompt="single", backbone="sd+dino", steps=3, batch_size=2, image_size=SIZE, mixed_precision="no", val_every=3,
        val_pairs=2, checkpoint_every=3, log_every=1, num_workers=0,
    )  # fmt: skip
    sd = sdm.tiny_stable_diffusion(0)
    encoders = PromptEncoders(dino=tiny_dinov2(0))
    result = train(cfg, sd, data, data, out_dir=tmp_path, encoders=encoders, progress=False)
    assert result.log["loss"].notna().all() and result.best_pck is not None
    featurizer = sdm.SDFeaturizer(sd, image_size=SIZE)
    module = load_prompt(tmp_path / "prompt.json", featurizer)
    initial = sdm.prompts.build_prompt("single", featurizer, seed=cfg.seed)
    assert not torch.equal(module.tokens, initial.tokens)  # the prompt moved
    meta = read_metadata(tmp_path / "prompt.json")
    assert meta.train_config["backbone"] == "sd+dino"
    extractor = build_backbone("sd+dino", encoders, SIZE).extractor(SDExtractor(featurizer, module))
    assert isinstance(extractor, FusedExtractor)
    scored = evaluate(extractor, data, max_pairs=2, progress=False)
    assert 0 <= scored.table.loc["all", "per_image@0.1"] <= 100


def test_sd_backbone_is_the_identity_and_needs_no_images() -> None:
    backbone = build_backbone("sd")
    feats = torch.randn(2, 4, 3, 3)
    assert backbone.features(feats, torch.zeros(2, 3, 0, 0)) is feats and not backbone.needs_images
    assert set(BACKBONES) == {"sd", "sd+dino"}
    with pytest.raises(ValueError, match="needs DINOv2"):
        build_backbone("sd+dino")
    with pytest.raises(ValueError, match="valid: sd, sd\\+dino"):
        build_backbone("sdxl")


@pytest.mark.slow
def test_cli_evaluates_a_fused_prompt_on_fused_features(tmp_path: Path) -> None:
    import subprocess

    sdm_bin = str(Path(sys.executable).with_name("sdm"))
    common = ["--model", "tiny", "--image-size", "64", "--dino", "tiny"]
    trained = subprocess.run(
        [sdm_bin, "train", *common, "--backbone", "sd+dino", "--steps", "1", "--batch-size", "2", "--val-split", "", "--mixed-precision", "no",
         "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    scored = subprocess.run(
        [sdm_bin, "evaluate", *common, "--prompt", str(tmp_path / "run" / "prompt.json"), "--max-pairs", "2", "--out", str(tmp_path / "eval")],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "backbone sd+dino" in scored.stderr
    assert any("sd+dino" in p.name for p in (tmp_path / "eval").iterdir())


def test_a_backbone_brings_its_own_featurizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backbone on another model is one class and one registry line: `train` takes both its training and its
    validation featurizers from `Backbone.featurizer` (here an SDFeaturizer that counts its UNet passes) and computes every feature
    there."""
    from sdm.backbones import StableDiffusionOnly

    calls: list[dict] = []

    class Counting(sdm.SDFeaturizer):
        used = 0

        def features_from_latents(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            Counting.used += 1
            return super().features_from_latents(*args, **kwargs)

    class Own(StableDiffusionOnly):
        def featurizer(self, sd, **settings):  # type: ignore[no-untyped-def]
            calls.append(settings)
            return Counting(sd, **settings)

    monkeypatch.setitem(BACKBONES, "own", Own)
    data = SyntheticPairs(n=4, image_size=SIZE, seed=4)
    cfg = TrainConfig(
        prompt="single", backbone="own", steps=2, batch_size=2, image_size=SIZE, mixed_precision="no", val_every=2,
        val_pairs=2, val_timestep=30, log_every=1, num_workers=0,
    )  # fmt: skip
    train(cfg, sdm.tiny_stable_diffusion(0), data, data, out_dir=tmp_path, progress=False)
    assert [c["timestep"] for c in calls] == [cfg.timestep, 30] and all(c["image_size"] == SIZE for c in calls)
    assert Counting.used >= 3  # both training steps and the validation ran through it
