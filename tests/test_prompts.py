"""Prompt registry: shapes, Class selection, CPM ablations, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sdm
from sdm.features import SDFeaturizer
from sdm.prompts import (
    CPM_ABLATIONS,
    PROMPTS,
    CPMConfig,
    PromptEncoders,
    build_prompt,
    category_text,
    load_prompt,
    save_prompt,
    tiny_clip_vision,
    tiny_dinov2,
)

CATS = ["cat", "dog", "car(G)"]


@pytest.fixture(scope="module")
def featurizer() -> SDFeaturizer:
    return SDFeaturizer(sdm.tiny_stable_diffusion(0), image_size=64)


@pytest.fixture(scope="module")
def encoders() -> PromptEncoders:
    return PromptEncoders(dino=tiny_dinov2(0), clip=tiny_clip_vision(0))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_every_prompt_gives_hidden_states(kind: str, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = build_prompt(kind, featurizer, categories=CATS, encoders=encoders)  # type: ignore[arg-type]
    src, trg = module.pair_prompts(featurizer, images(2, 0), images(2, 1), ["cat", "dog"])
    for p in (src, trg):
        assert featurizer.encode_prompt(p, batch_size=2).shape == (2, 77, 32)
    feats = featurizer(images(2, 0), src)
    assert feats.shape == (2, 64, 4, 4) and torch.isfinite(feats).all()


def test_template_normalises_categories(featurizer: SDFeaturizer) -> None:
    module = build_prompt("template", featurizer)
    assert module.image_prompt(featurizer, None, ["car(G)", "pottedplant"]) == ["a photo of a car", "a photo of a potted plant"]
    assert category_text("winebottle(woC)") == "winebottle"


def test_class_picks_the_category_prompt(featurizer: SDFeaturizer) -> None:
    module = build_prompt("class", featurizer, categories=CATS)
    assert module.tokens.shape == (3, 75, 32)
    picked = module.image_prompt(featurizer, None, ["dog", "cat", "dog"])
    idx = [module.categories.index(c) for c in ["dog", "cat", "dog"]]
    torch.testing.assert_close(picked, module.tokens[idx])
    with pytest.raises(ValueError, match="no learned prompt for categories"):
        module.image_prompt(featurizer, None, ["horse"])


def test_single_starts_from_vocabulary_embeddings(featurizer: SDFeaturizer) -> None:
    module = build_prompt("single", featurizer, seed=3)
    emb = featurizer.sd.text_encoder.embeddings
    tok = module.tokens[0]
    # each vector minus its position embedding is a row of the token embedding table
    words = tok - emb.position_embedding.weight[1:76]
    dist = torch.cdist(words, emb.token_embedding.weight)
    assert dist.min(dim=1).values.max() < 1e-3  # typical distances between rows are ~0.15


def test_captioner_starts_as_the_empty_prompt(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = build_prompt("captioner", featurizer, encoders=encoders)
    hidden = module.image_prompt(featurizer, images(2, 0), ["a", "b"])
    torch.testing.assert_close(hidden, featurizer.encode_text([""]).expand(2, -1, -1))


def cpm(featurizer: SDFeaturizer, encoders: PromptEncoders, **overrides) -> torch.nn.Module:
    module = build_prompt("cpm", featurizer, encoders=encoders, cpm=CPMConfig(**overrides))
    with torch.no_grad():
        module.omega_alpha.normal_()  # starts at zero; make the conditioning visible
    return module


def test_cpm_pair_conditioning(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = cpm(featurizer, encoders)
    assert module.conditioning == "pair"
    a, b, c = images(1, 0), images(1, 1), images(1, 2)
    src, trg = module.pair_prompts(featurizer, a, b, ["x"])
    assert src.shape == (1, 75, 32)
    torch.testing.assert_close(src, trg)  # one prompt for both images
    other, _ = module.pair_prompts(featurizer, a, c, ["x"])
    assert not torch.allclose(src, other)  # the source's prompt depends on the target
    torch.testing.assert_close(src[:, :25], module.global_tokens)  # global part first
    assert module.g_d.in_features == 2 * 32 and module.g_n.in_features == 256
    with pytest.raises(NotImplementedError, match="pair_prompts"):
        module.image_prompt(featurizer, a, ["x"])


def test_cpm_single_image_conditioning(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = cpm(featurizer, encoders, condition="image")
    assert module.conditioning == "image" and module.g_d.in_features == 32
    a, b, c = images(1, 0), images(1, 1), images(1, 2)
    src1, trg1 = module.pair_prompts(featurizer, a, b, ["x"])
    src2, _ = module.pair_prompts(featurizer, a, c, ["x"])
    torch.testing.assert_close(src1, src2)  # the source prompt ignores the target
    assert not torch.allclose(src1, trg1)
    torch.testing.assert_close(src1, module.image_prompt(featurizer, a, ["x"]))


def test_cpm_global_descriptor(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = cpm(featurizer, encoders, descriptor="global")
    assert module.g_n.in_features == 1
    desc = module.dino(images(2, 0), "global")
    assert desc.shape == (2, 1, 32)
    assert module.dino(images(2, 0), "patch").shape == (2, 256, 32)
    src, _ = module.pair_prompts(featurizer, images(2, 0), images(2, 1), ["x", "y"])
    assert src.shape == (2, 75, 32)


def test_cpm_without_global_prompt_and_without_gn(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    no_global = cpm(featurizer, encoders, global_prompt=False)
    src, _ = no_global.pair_prompts(featurizer, images(1, 0), images(1, 1), ["x"])
    assert src.shape == (1, 50, 32) and no_global.global_tokens is None
    no_gn = cpm(featurizer, encoders, use_gn=False)
    assert no_gn.g_n is None
    desc = torch.randn(1, 256, 64)
    f = no_gn.g_d(desc).transpose(1, 2)
    expected = torch.nn.functional.adaptive_max_pool1d(f, 50).transpose(1, 2) * no_gn.omega_alpha + no_gn.omega_pos
    torch.testing.assert_close(no_gn.condition_tokens(desc), expected)


def test_all_six_ablations_build(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    assert len(CPM_ABLATIONS) == 6
    n_params = set()
    for overrides in CPM_ABLATIONS.values():
        module = build_prompt("cpm", featurizer, encoders=encoders, cpm=CPMConfig(**overrides))
        n_params.add(sum(p.numel() for p in module.trainable_state().values()))
    assert len(n_params) == 6  # six different computations


def test_parameter_groups(featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    groups = build_prompt("cpm", featurizer, encoders=encoders).parameter_groups(1e-2, 1e-3)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]
    assert sum(p.numel() for p in groups[1]["params"]) == 64 * 32 + 32 + 256 * 256 + 256  # g_d and g_n
    assert all(not p.requires_grad for p in build_prompt("cpm", featurizer, encoders=encoders).dino.parameters())


@pytest.mark.parametrize("kind", ["single", "class", "cpm"])
def test_save_load_round_trip(kind: str, tmp_path: Path, featurizer: SDFeaturizer, encoders: PromptEncoders) -> None:
    module = build_prompt(kind, featurizer, categories=CATS, encoders=encoders, cpm=CPMConfig(use_gn=False), seed=4)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in module.trainable_state().values():
            p.add_(0.5)
    path = save_prompt(module, tmp_path / "p", featurizer, step=12, train_config={"lr": 0.01})
    meta = json.loads((tmp_path / "p.json").read_text())
    assert meta["kind"] == kind and meta["step"] == 12 and meta["random_weights"] is True
    loaded = load_prompt(path, featurizer, encoders=encoders)
    for k, v in module.trainable_state().items():
        torch.testing.assert_close(loaded.trainable_state()[k], v)
    assert not any(k.startswith("dino.") for k in module.trainable_state())


def test_load_into_wrong_model_names_shapes(tmp_path: Path, featurizer: SDFeaturizer) -> None:
    save_prompt(build_prompt("single", featurizer), tmp_path / "p", featurizer)
    other = SDFeaturizer(_wide_tiny(), image_size=64)
    with pytest.raises(ValueError, match=r"tokens: saved \[1, 75, 32\] vs model \[1, 75, 48\]"):
        load_prompt(tmp_path / "p", other)


def _wide_tiny() -> sdm.StableDiffusion:
    """The tiny model with a 48-wide text encoder (a model the saved prompt does not fit)."""
    from transformers import CLIPTextModel

    from sdm.models import TINY_VOCAB_SIZE, _text_config

    sd = sdm.tiny_stable_diffusion(0)
    sd.text_encoder = CLIPTextModel(_text_config(48, 1, 4, 64, TINY_VOCAB_SIZE)).eval()
    return sd


def test_unknown_prompt_and_missing_encoders(featurizer: SDFeaturizer) -> None:
    with pytest.raises(ValueError, match="unknown prompt 'best'"):
        build_prompt("best", featurizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DINOv2"):
        build_prompt("cpm", featurizer)
    with pytest.raises(ValueError, match="categories"):
        build_prompt("class", featurizer)
