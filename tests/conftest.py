"""Shared test settings: no network (model hubs are unreachable here), paths to the shared test data, and the
fixtures many modules use (the tiny random-weight model and a featurizer on it, one of each per test module)."""

import os
from pathlib import Path

import pytest
import torch

# Set before anything imports huggingface_hub, so hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# The real test data (PF-Willow, an SPair-71k sample, PF-Pascal pairs): $SDM_TEST_DATA, else ../shared/data.
SHARED_DATA = Path(os.environ.get("SDM_TEST_DATA") or REPO.parent / "shared" / "data")
# Subprocess tests run quick commands (seconds on an idle 2-core machine) but CI machines may be busy (load 3-6
# made a 29 s command take 6 minutes): a limit that only catches a hang.
SUBPROCESS_TIMEOUT = 1800


@pytest.fixture(scope="module")
def sd():  # -> sdm.StableDiffusion
    """The tiny random-weight Stable Diffusion (seed 0), one per test module."""
    import sdm

    return sdm.tiny_stable_diffusion(0)


@pytest.fixture(scope="module")
def featurizer(sd):  # -> sdm.SDFeaturizer
    """An `SDFeaturizer` on `sd` at 64 px (timestep 50, ensemble 8), one per test module."""
    import sdm

    return sdm.SDFeaturizer(sd, image_size=64)


def one_hot_maps(h: int = 6, w: int = 8):  # -> (src 1 x C x h x w, trg, query 1 x 2 x 2)
    """Source cell (x, y) holds basis vector e_(y*w+x); the target is the source shifted by (+1, +2)."""
    c = h * w
    src = torch.eye(c).view(c, h, w).unsqueeze(0)
    trg = torch.zeros_like(src)
    trg[..., 2:, 1:] = src[..., :-2, :-1]
    query = torch.tensor([[[1.0, 1.0], [4.0, 2.0]]])
    return src, trg, query


def clip_transformer(encoder: torch.nn.Module) -> torch.nn.Module:
    """The part of a transformers CLIPTextModel holding `embeddings`, `encoder` and `final_layer_norm`: the model
    itself in recent transformers 5.x, its `text_model` in 5.0 (tests read the model directly, not through sdm)."""
    return getattr(encoder, "text_model", encoder)
