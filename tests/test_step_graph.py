"""The CUDA-graph training step (TrainConfig.cuda_graph): what can be checked without a GPU. The graph itself is
checked on a GPU by benchmarks/check_cuda_graph.py (eager and graph runs train the same prompt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdm
from sdm.data import SyntheticPairs
from sdm.loss import gaussian_cross_entropy
from sdm.step_graph import pad_rows
from sdm.train import TrainConfig, train


def test_keypoint_rows_padded_to_a_multiple_of_eight_give_the_same_loss_and_gradients() -> None:
    """The graph path pads keypoint rows (zeros beyond n_kps) so that few keypoint widths need a graph: the padded
    rows are masked out, so loss and gradients are those of the unpadded batch (to float rounding)."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 8, 12, 12, generator=g, requires_grad=True)
    trg = torch.randn(3, 8, 12, 12, generator=g, requires_grad=True)
    n = torch.tensor([10, 3, 7])
    src_xy, trg_xy = torch.rand(3, 10, 2, generator=g) * 11, torch.rand(3, 10, 2, generator=g) * 11
    for b, k in enumerate(n.tolist()):  # rows beyond n_kps are zeros, as collate_pairs pads them
        src_xy[b, k:] = 0
        trg_xy[b, k:] = 0
    padded = pad_rows(src_xy, 8), pad_rows(trg_xy, 8)
    assert padded[0].shape == (3, 16, 2) and torch.equal(padded[0][:, :10], src_xy) and not padded[0][:, 10:].any()
    assert pad_rows(torch.zeros(2, 16, 2), 8).shape == (2, 16, 2)
    plain = gaussian_cross_entropy(src, trg, src_xy, trg_xy, n)
    grads = torch.autograd.grad(plain, (src, trg))
    wide = gaussian_cross_entropy(src, trg, *padded, n)
    wide_grads = torch.autograd.grad(wide, (src, trg))
    torch.testing.assert_close(wide, plain, rtol=1e-6, atol=0)
    for a, b in zip(wide_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cuda_graph_refuses_what_it_does_not_support(tmp_path: Path) -> None:
    sd, data = sdm.tiny_stable_diffusion(0), SyntheticPairs(n=4, image_size=64, seed=0)
    base = dict(steps=1, batch_size=2, image_size=64, mixed_precision="no", val_every=0, num_workers=0, cuda_graph=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train(TrainConfig(**base, gradient_checkpointing=True), sd, data, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="category-conditioned"):
        train(TrainConfig(**base, prompt="class"), sd, data, out_dir=tmp_path / "b", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device; this run is on cpu"):
            train(TrainConfig(**base), sd, data, out_dir=tmp_path / "c", progress=False)


def test_cuda_graph_is_a_setting_a_resumed_run_may_change() -> None:
    from sdm.train import _RESUMABLE_CHANGES

    assert "cuda_graph" in _RESUMABLE_CHANGES and TrainConfig().cuda_graph is False
