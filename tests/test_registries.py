"""Extending sdm in one place each: a matcher, a prompt kind and a dataset, each defined here and registered with
one call, then used through `sdm.load_method`, the command line's parser, evaluation, and save/load."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sdm
from sdm import config
from sdm.backbones import BACKBONES, StableDiffusionOnly, register_backbone
from sdm.cli import build_parser, main
from sdm.data import DATASETS, SyntheticPairs, register_dataset
from sdm.matching import MATCHER_FUNCTIONS, MatchConfig, nearest_neighbour, register_matcher
from sdm.prompt_files import load_prompt, save_prompt
from sdm.prompts import PROMPTS, SinglePrompt, build_prompt, register_prompt


@pytest.fixture(autouse=True)
def registries_restored() -> Iterator[None]:
    """What a test registers is gone after it (the registries and the names of sdm.config)."""
    saved = [(r, copy.copy(r)) for r in (MATCHER_FUNCTIONS, PROMPTS, DATASETS, BACKBONES)]
    names = [(n, list(n)) for n in (config.MATCHERS, config.PROMPT_KINDS, config.LEARNED, config.DATASET_NAMES, config.BACKBONE_NAMES)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)
    for current, before in names:
        current[:] = before


def shifted(src: torch.Tensor, trg: torch.Tensor, query: torch.Tensor, *, temperature: float, sigma: float, similarity: str) -> torch.Tensor:
    """A matcher for the test: nearest neighbour, one cell to the right (clamped), so its effect is visible."""
    cells = nearest_neighbour(src, trg, query, similarity=similarity)  # type: ignore[arg-type]
    return torch.stack([(cells[..., 0] + 1).clamp(max=trg.shape[-1] - 1), cells[..., 1]], dim=-1)


class ShortPrompt(SinglePrompt):
    """A Single prompt of 4 learned vectors by default: a new kind with a setting of its own."""

    kind = "short"

    @classmethod
    def build(cls, featurizer, opts):  # type: ignore[no-untyped-def]
        opts.n_tokens = min(opts.n_tokens, 4)
        return super().build(featurizer, opts)


class FewPairs(SyntheticPairs):
    """Four synthetic pairs, built as the file datasets are: (root, split, image_size, category)."""

    def __init__(self, root: object = None, split: str = "test", image_size: int = 64, category: str | None = None) -> None:
        super().__init__(n=4, image_size=image_size, seed=11)


def test_a_matcher_registered_in_one_call(capsys: pytest.CaptureFixture[str]) -> None:
    register_matcher("shifted", shifted)
    assert "shifted" in build_parser().parse_args(["evaluate", "--matcher", "shifted"]).matcher
    feats = torch.randn(1, 8, 4, 5)
    query = torch.tensor([[[1.0, 2.0]]])
    assert sdm.matching.match(feats, feats, query, MatchConfig("shifted")).tolist() == [[[2.0, 2.0]]]
    pairs = FewPairs()
    method = sdm.load_method("empty", model=sdm.tiny_stable_diffusion(0), image_size=64, ensemble=1)
    result = method.evaluate(pairs, matcher="shifted", progress=False)
    assert result.info["protocol"]["matcher"] == "shifted"


def test_a_prompt_kind_registered_in_one_call(tmp_path: Path) -> None:
    register_prompt(ShortPrompt, learned=True)
    assert build_parser().parse_args(["train", "--prompt", "short"]).prompt == "short"
    sd = sdm.tiny_stable_diffusion(0)
    featurizer = sdm.SDFeaturizer(sd, image_size=64, ensemble=1)
    module = build_prompt("short", featurizer, seed=2)
    assert module.tokens.shape[1] == 4
    save_prompt(module, tmp_path / "short", featurizer)
    loaded = load_prompt(tmp_path / "short", featurizer)
    assert type(loaded) is ShortPrompt and torch.equal(loaded.tokens, module.tokens)
    method = sdm.load_method(str(tmp_path / "short.safetensors"), model=sd, image_size=64, ensemble=1)
    assert method.name == "short_t50_e1"
    untrained = sdm.load_method("short", model=sd, image_size=64, ensemble=1)
    assert untrained.protocol["prompt_state"].startswith("untrained")


def test_a_dataset_registered_in_one_call(tmp_path: Path) -> None:
    register_dataset("few", FewPairs)
    args = ["evaluate", "--model", "tiny", "--dataset", "few", "--root", str(tmp_path), "--image-size", "64"]
    assert main([*args, "--ensemble", "1", "--out", str(tmp_path / "r")]) == 0
    (written,) = (tmp_path / "r").glob("few_test_*.json")
    assert written.name.startswith("few_test_empty_t50_e1")


def test_a_backbone_registered_in_one_call() -> None:
    class Plain(StableDiffusionOnly):
        """The SD features as they are, under another name."""

    register_backbone("plain", Plain)
    assert build_parser().parse_args(["train", "--backbone", "plain"]).backbone == "plain"
    sd = sdm.tiny_stable_diffusion(0)
    method = sdm.load_method("empty", model=sd, image_size=64, ensemble=1, backbone="plain")
    assert method.name == "empty-plain_t50_e1"
