"""`sdm.load_method`: one way in. A method loaded by name computes what the same method assembled by hand
computes, and loads only what it needs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import sdm
from sdm.config import AttentionMatcherConfig
from sdm.data import SyntheticPairs
from sdm.evaluate import evaluate
from sdm.extractors import SDExtractor
from sdm.methods import load_method
from sdm.prompt_files import load_prompt, save_prompt
from sdm.prompts import build_prompt

SIZE = 64


@pytest.fixture(scope="module")
def pairs() -> SyntheticPairs:
    return SyntheticPairs(n=3, image_size=SIZE, seed=5)


def test_a_saved_prompt_by_name_equals_the_prompt_assembled_by_hand(sd: sdm.StableDiffusion, pairs: SyntheticPairs, tmp_path: Path) -> None:
    featurizer = sdm.SDFeaturizer(sd, image_size=SIZE, ensemble=2)
    save_prompt(build_prompt("single", featurizer, seed=3), tmp_path / "p", featurizer)
    by_hand = evaluate(SDExtractor(featurizer, load_prompt(tmp_path / "p", featurizer)), pairs, progress=False)
    method = load_method(str(tmp_path / "p.safetensors"), model=sd, image_size=SIZE, ensemble=2)
    by_name = method.evaluate(pairs, progress=False)
    pd.testing.assert_frame_equal(by_name.table, by_hand.table)
    protocol = by_name.info["protocol"]
    assert protocol["prompt_file"] == str(tmp_path / "p.safetensors") and len(protocol["prompt_hash"]) == 32
    assert method.name == "single_t50_e2" and by_name.info["model"] == "tiny"


def test_a_method_loads_only_what_it_needs(sd: sdm.StableDiffusion, monkeypatch: pytest.MonkeyPatch) -> None:
    import sdm.encoders
    import sdm.models

    loaded: list[str] = []
    real = sdm.encoders.load_dino
    monkeypatch.setattr(sdm.encoders, "load_dino", lambda name, device=None: loaded.append(name) or real(name, device))
    load_method("single", model=sd, image_size=SIZE)
    assert loaded == []  # a Single prompt needs no DINOv2
    load_method("cpm", model=sd, image_size=SIZE, dino="tiny")
    assert loaded == ["tiny"]
    monkeypatch.setattr(sdm.models, "load_model", lambda *a, **k: pytest.fail("a ViT baseline loaded Stable Diffusion"))
    vit = load_method("vit:tiny", vit_size=56)
    assert vit.model == "tiny" and vit.featurizer is None and vit.extractor is not None


def test_learned_kinds_by_name_are_untrained_and_say_so(sd: sdm.StableDiffusion, pairs: SyntheticPairs) -> None:
    method = load_method("class", model=sd, image_size=SIZE, ensemble=1, categories=pairs.categories)
    assert method.name == "class-untrained_t50_e1" and "UNTRAINED class prompt" in method.notes[0]
    result = method.evaluate(pairs, progress=False)
    assert result.info["protocol"]["prompt_state"] == "untrained (initial vectors)"
    assert "random weights" in result.table.columns.name


def test_the_attention_matcher_by_name(sd: sdm.StableDiffusion, pairs: SyntheticPairs) -> None:
    config = AttentionMatcherConfig(steps=1, num_embeddings=1, inference_crops=1, progress=False)
    method = load_method("attention", model=sd, image_size=SIZE, attention=config)
    result = method.evaluate(pairs, max_pairs=1, progress=False)
    assert method.attention is not None and method.attention.config.image_size == (SIZE, SIZE)
    assert result.info["protocol"]["matcher"] == "attention" and result.info["protocol"]["matcher_params"]["steps"] == 1
