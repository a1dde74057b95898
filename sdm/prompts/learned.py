"""Learned prompts without image conditioning: Single (one universal prompt) and Class (one per category)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from sdm.devices import upload
from sdm.draws import derived_seed
from sdm.features import PromptInput, SDFeaturizer
from sdm.prompts.base import (
    BuildOptions,
    Conditioning,
    Originals,
    PromptModule,
    register_prompt,
)


def learned_vectors(featurizer: SDFeaturizer, n_tokens: int, count: int, seed: int) -> torch.Tensor:
    """Initial vectors of `count` learned prompts: token embeddings of random vocabulary ids, or, for 77 learned
    hidden states, torch.rand (hidden_state.py:60)."""
    if n_tokens == featurizer.sd.text.length:
        gen = torch.Generator().manual_seed(derived_seed(seed, "hidden_state"))
        return torch.rand(count, n_tokens, featurizer.sd.embed_dim, generator=gen)
    return random_token_vectors(featurizer, n_tokens, count=count, seed=seed)


def random_token_vectors(featurizer: SDFeaturizer, n: int, count: int = 1, first_position: int = 1, seed: int = 0) -> torch.Tensor:
    """`count` x n embedding-layer outputs of random vocabulary ids at positions first_position.. (how learned
    prompts start). Ids are uniform over [0, vocab_size), special tokens included, as the authors' code draws
    them (src/stable_diffusion/hidden_state.py:65)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(featurizer.sd.text.vocab_size, (count, n), generator=g).to(featurizer.device)
    return featurizer.sd.text.token_embeddings(ids, first_position).float()


class SinglePrompt(PromptModule):
    """One universal learned prompt of `n_tokens` (75) vectors."""

    kind = "single"
    needs_images = False  # its prompt does not depend on the pixels
    conditioning: ClassVar[Conditioning] = "fixed"

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        return cls(learned_vectors(featurizer, opts.n_tokens, 1, opts.seed))

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(init.clone().float())  # 1 x N x D

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        return self.tokens

    def config(self) -> dict[str, Any]:
        return {"n_tokens": self.tokens.shape[1]}


class ClassPrompt(PromptModule):
    """One learned 75-vector prompt per category, picked by the pair's category."""

    kind = "class"
    needs_images = False  # its prompt does not depend on the pixels
    conditioning: ClassVar[Conditioning] = "category"

    @classmethod
    def build(cls, featurizer: SDFeaturizer, opts: BuildOptions) -> PromptModule:
        if not opts.categories:
            raise ValueError("the Class prompt needs the list of categories")
        return cls(learned_vectors(featurizer, opts.n_tokens, len(opts.categories), opts.seed), sorted(opts.categories))

    def __init__(self, init: torch.Tensor, categories: list[str]) -> None:
        super().__init__()
        if init.shape[0] != len(categories):
            raise ValueError(f"{init.shape[0]} initial prompts for {len(categories)} categories")
        self.categories = list(categories)
        self.index = {c: i for i, c in enumerate(self.categories)}
        self.tokens = nn.Parameter(init.clone().float())  # C x N x D

    def image_prompt(
        self, featurizer: SDFeaturizer, images: torch.Tensor | None, categories: list[str], originals: Originals | None = None
    ) -> PromptInput:
        unknown = sorted({c for c in categories if c not in self.index})
        if unknown:
            raise ValueError(f"no learned prompt for categories {unknown}; this Class prompt knows {self.categories}")
        # the index through pinned memory: built on the GPU directly, it would wait for the previous step's work
        return self.tokens[upload(torch.tensor([self.index[c] for c in categories]), self.tokens.device)]

    def config(self) -> dict[str, Any]:
        return {"n_tokens": self.tokens.shape[1], "categories": self.categories}


for _kind in (SinglePrompt, ClassPrompt):
    register_prompt(_kind, learned=True)

__all__ = ["ClassPrompt", "SinglePrompt", "learned_vectors", "random_token_vectors"]
