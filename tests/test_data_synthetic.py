"""SyntheticPairs: exact correspondences, points inside the images, determinism, speed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdm.data import PHOTOS, SyntheticPairs, apply_homography, collate_pairs, decoding, load_dataset
from sdm.data.synthetic import homography_from_points, warp_image


def _sample(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear (align corners) colours of 3 x H x W at K x 2 pixel points -> K x 3."""
    _, h, w = image.shape
    grid = torch.stack([xy[:, 0] * 2 / (w - 1) - 1, xy[:, 1] * 2 / (h - 1) - 1], dim=-1)[None, None]
    return F.grid_sample(image[None], grid, align_corners=True)[0, :, 0].T


def test_homography_algebra() -> None:
    src = np.array([[0.0, 0.0], [9.0, 0.0], [9.0, 7.0], [0.0, 7.0]])
    dst = np.array([[1.0, 2.0], [10.0, 1.0], [11.0, 9.0], [0.5, 8.0]])
    h = homography_from_points(src, dst)
    np.testing.assert_allclose(apply_homography(h, src), dst, atol=1e-9)


def test_warp_moves_a_pixel_to_its_homography_image() -> None:
    image = torch.zeros(3, 32, 40)
    image[:, 10, 12] = 1.0
    h = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, -3.0], [0.0, 0.0, 1.0]])  # pure translation by (5, -3)
    out = warp_image(image, h)
    # (row y, column x) = (10 - 3, 12 + 5), up to float32 rounding of the sampling grid
    assert float(out[0, 7, 17]) == pytest.approx(1.0, abs=1e-4)
    assert float(out[0].sum()) == pytest.approx(1.0, abs=1e-4)


def test_keypoints_follow_the_warp() -> None:
    ds = SyntheticPairs(n=12, image_size=128, seed=3, n_kps=8, photometric=False)
    errors, shuffled = [], []
    for i in range(len(ds)):
        pair = ds[i]
        assert pair.src_image.shape == pair.trg_image.shape == (3, 128, 128)
        assert pair.n_kps == 8 and pair.src_kps.shape == (8, 2)
        # the stored homography maps each source point onto its target point
        mapped = apply_homography(pair.extra["homography"], pair.src_kps.numpy())
        np.testing.assert_allclose(mapped, pair.trg_kps.numpy(), atol=1e-3)
        # and carries the pixel content: colours agree up to bilinear resampling
        s, t = _sample(pair.src_image, pair.src_kps), _sample(pair.trg_image, pair.trg_kps)
        errors.append((s - t).abs().mean(dim=1))
        shuffled.append((s - t.roll(1, dims=0)).abs().mean(dim=1))
    err, base = torch.cat(errors), torch.cat(shuffled)
    assert float(err.median()) < 0.01 and float(err.mean()) < 0.03
    assert float(base.mean()) > 5 * float(err.mean())


def test_points_inside_and_threshold() -> None:
    ds = SyntheticPairs(n=30, image_size=(96, 160), seed=1, n_kps=12)
    for i in range(len(ds)):
        pair = ds[i]
        for kps in (pair.src_kps, pair.trg_kps):
            assert torch.all(kps >= 0)
            assert torch.all(kps[:, 0] <= 159) and torch.all(kps[:, 1] <= 95)
        extent = (pair.trg_kps.max(dim=0).values - pair.trg_kps.min(dim=0).values).max()
        assert pair.threshold == pytest.approx(float(extent))
        assert pair.threshold >= 0.25 * 96
        assert 0.0 <= float(pair.trg_image.min()) and float(pair.trg_image.max()) <= 1.0
    assert ds.categories == sorted(PHOTOS)


def test_determinism() -> None:
    a, b = SyntheticPairs(n=4, image_size=64, seed=7), SyntheticPairs(n=4, image_size=64, seed=7)
    other = SyntheticPairs(n=4, image_size=64, seed=8)
    for i in range(4):
        pa, pb = a[i], b[i]
        assert torch.equal(pa.src_image, pb.src_image) and torch.equal(pa.trg_image, pb.trg_image)
        assert torch.equal(pa.src_kps, pb.src_kps) and torch.equal(pa.trg_kps, pb.trg_kps)
        assert not torch.equal(pa.trg_kps, other[i].trg_kps)
    assert torch.equal(a[2].trg_image, a[2].trg_image)  # random access, no hidden state
    # the jitter changes pixels, not geometry
    plain = SyntheticPairs(n=4, image_size=64, seed=7, photometric=False)
    assert torch.equal(plain[1].trg_kps, a[1].trg_kps) and not torch.equal(plain[1].trg_image, a[1].trg_image)


def test_images_view_and_ids() -> None:
    ds = SyntheticPairs(n=3, image_size=32, seed=5)
    images = ds.images()
    assert len(images) == 6
    image_id, image = images[3]
    assert image_id == "synthetic:5:1:trg" and torch.equal(image, ds[1].trg_image)
    batch = collate_pairs([ds[0], ds[1], ds[2]])
    assert batch.pair_ids == ["synthetic:5:0", "synthetic:5:1", "synthetic:5:2"]
    assert batch.categories == ["astronaut", "camera", "cat"]


def test_pairs_without_images_keep_their_keypoints() -> None:
    """`decode_images` off (what training and evaluation ask of a dataset when the images are not looked at): empty
    3 x 0 x 0 images, the same keypoints, ids and threshold; `load_image` still gives each image."""
    ds = SyntheticPairs(n=3, image_size=32, seed=5)
    lean = decoding(ds, False)
    for i in range(3):
        full, bare = ds[i], lean[i]
        assert bare.src_image.shape == bare.trg_image.shape == (3, 0, 0)
        assert torch.equal(bare.src_kps, full.src_kps) and torch.equal(bare.trg_kps, full.trg_kps)
        assert (bare.src_id, bare.trg_id, bare.threshold) == (full.src_id, full.trg_id, full.threshold)
        assert torch.equal(lean.load_image(full.trg_id), full.trg_image)
    assert ds.decode_images  # the caller's set is unchanged


def test_pair_batches_pin_every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DataLoader with pin_memory=True pins a batch through its `pin_memory` method (evaluation and training set
    it on CUDA machines); every tensor goes through, the lists stay. Pinning itself needs CUDA, so it is marked."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = collate_pairs([SyntheticPairs(n=2, image_size=32, seed=5)[i] for i in range(2)])
    pinned_ids: list[int] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned_ids.append(id(t)) or t.clone())
    out = pin_memory(batch)
    assert type(out) is type(batch) and out.pair_ids == batch.pair_ids and out.extra == batch.extra
    assert sorted(pinned_ids) == sorted(id(getattr(batch, n)) for n in type(batch).TENSORS)
    assert set(type(batch).TENSORS) == {n for n, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    for name in type(batch).TENSORS:
        assert torch.equal(getattr(out, name), getattr(batch, name)) and getattr(out, name) is not getattr(batch, name)


def test_registry_synthetic_splits() -> None:
    val = load_dataset("synthetic", split="val", image_size=32, n=2)
    test = load_dataset("synthetic", split="test", image_size=32, n=2, category="rocket")
    assert len(val) == 2 and val[0].pair_id != test[0].pair_id and test.categories == ["rocket"]
    with pytest.raises(ValueError, match="astronaut, camera"):
        SyntheticPairs(n=1, photos=["dog"])
