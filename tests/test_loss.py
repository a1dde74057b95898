"""sdm.loss: the Gaussian-smoothed cross-entropy, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import one_hot_maps

from sdm import matching
from sdm.loss import gaussian_cross_entropy, gaussian_window


def test_gaussian_window_weights() -> None:
    offsets, weights = gaussian_window(7, 1.5)
    assert offsets.shape == (49, 2)
    centre = weights[24]
    torch.testing.assert_close(centre, torch.tensor(1 / (2 * math.pi * 1.5**2)))
    torch.testing.assert_close(weights[25] / centre, torch.tensor(math.exp(-1 / (2 * 1.5**2))))


def test_loss_hand_computed() -> None:
    """Reference: the same loss written as explicit loops over points and window cells."""
    torch.manual_seed(0)
    src, trg = torch.randn(2, 6, 9, 10), torch.randn(2, 6, 9, 10)
    src_xy = torch.tensor([[[2.0, 3.0], [7.5, 1.2], [0.0, 0.0]], [[4.0, 4.0], [1.0, 8.0], [9.0, 2.0]]])
    trg_xy = torch.tensor([[[5.0, 4.0], [2.3, 6.7], [0.0, 0.0]], [[8.6, 0.5], [3.0, 3.0], [4.5, 7.9]]])
    n_valid = torch.tensor([2, 3])
    got = gaussian_cross_entropy(src, trg, src_xy, trg_xy, n_valid)

    def bilinear(m: torch.Tensor, x: float, y: float) -> torch.Tensor:
        x0, y0 = math.floor(x), math.floor(y)
        ax, ay = x - x0, y - y0
        return (
            m[y0, x0] * (1 - ax) * (1 - ay)
            + m[y0, x0 + 1] * ax * (1 - ay)
            + m[y0 + 1, x0] * (1 - ax) * ay
            + m[y0 + 1, x0 + 1] * ax * ay
        )

    total = 0.0
    for b in range(2):
        pair = 0.0
        for k in range(int(n_valid[b])):
            q = matching.sample_features(src[b : b + 1], src_xy[b : b + 1, k : k + 1])[0, 0]
            cos = torch.nn.functional.cosine_similarity(q[:, None, None], trg[b], dim=0)
            p = torch.softmax(cos.flatten() / 0.04, 0).view(9, 10)
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    x, y = float(trg_xy[b, k, 0]) + dx, float(trg_xy[b, k, 1]) + dy
                    if 0 < x < 9 and 0 < y < 8:
                        wgt = math.exp(-(dx * dx + dy * dy) / (2 * 1.5**2)) / (2 * math.pi * 1.5**2)
                        pair -= wgt * float(torch.log(bilinear(p, x, y)))
        total += pair / int(n_valid[b])
    torch.testing.assert_close(got, torch.tensor(total / 2), rtol=1e-4, atol=1e-5)


def test_loss_ignores_padding_and_has_gradient() -> None:
    src = torch.randn(1, 4, 6, 6, requires_grad=True)
    trg = torch.randn(1, 4, 6, 6)
    xy = torch.tensor([[[2.0, 2.0], [3.0, 3.0]]])
    a = gaussian_cross_entropy(src, trg, xy, xy, torch.tensor([1]))
    b = gaussian_cross_entropy(src, trg, xy[:, :1], xy[:, :1], torch.tensor([1]))
    torch.testing.assert_close(a, b)
    a.backward()
    assert src.grad is not None and src.grad.abs().sum() > 0


def test_loss_lower_for_matching_features() -> None:
    src, trg, _ = one_hot_maps(14, 14)
    xy = torch.tensor([[[5.0, 4.0], [6.0, 5.0]]])  # every window stays inside the map
    right = gaussian_cross_entropy(src, trg, xy, xy + torch.tensor([1.0, 2.0]), torch.tensor([2]))
    wrong = gaussian_cross_entropy(src, trg, xy, xy + torch.tensor([3.0, 2.0]), torch.tensor([2]))
    assert right < wrong


def test_loss_bad_input() -> None:
    f = torch.randn(1, 4, 6, 6)
    xy = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="every pair needs a keypoint"):
        gaussian_cross_entropy(f, f, xy, xy, torch.tensor([0]))
    with pytest.raises(ValueError, match="same shape"):
        gaussian_cross_entropy(f, f, xy, xy[:, :1], torch.tensor([1]))
