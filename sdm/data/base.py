"""The pair sample shared by every dataset, its collate function, and image/keypoint helpers.

Conventions (docs/specification.md, "Input" and "PCK"): coordinates are (x, y) pixels; images are resized to
``image_size`` without keeping the aspect ratio, and keypoints are scaled per axis by exactly the
resize factors, x' = x * (W_new / W_orig), y' = y * (H_new / H_orig). Thresholds live in that
resized space too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DatasetNotFoundError, ImageReadError, check_category, download_hint, missing_error

ImageSize = int | tuple[int, int]
OriginalLoader = Callable[[str], Image.Image]  # image id -> the image as stored (`PairDataset.original_image`)


def as_hw(image_size: ImageSize) -> tuple[int, int]:
    """``768`` -> ``(768, 768)``; ``(H, W)`` is returned as is (both must be positive)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"image_size must be a positive int or (H, W); got {image_size!r}")
    return hw[0], hw[1]


def _read_image(path: Path) -> Image.Image:
    """Open an image fully as RGB; a missing or corrupt file raises ImageReadError naming ``path``."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that truncated files fail here rather than later
            return im.convert("RGB")
    except FileNotFoundError as err:
        raise ImageReadError(f"image not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def _read_size(path: Path) -> tuple[int, int]:
    """Original (W, H) of an image from its header only (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError as err:
        raise ImageReadError(f"image not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def pil_to_tensor(image: Image.Image, size_hw: tuple[int, int]) -> torch.Tensor:
    """Resize (bilinear, aspect not kept) and convert to a float tensor 3 x H x W in [0, 1]."""
    h, w = size_hw
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _scale_factors(orig_wh: tuple[int, int], size_hw: tuple[int, int]) -> tuple[float, float]:
    """Per-axis factors (sx, sy) = (W_new / W_orig, H_new / H_orig) used for keypoints and boxes."""
    return size_hw[1] / orig_wh[0], size_hw[0] / orig_wh[1]


def _scale_points(xy: torch.Tensor, orig_wh: tuple[int, int], size_hw: tuple[int, int]) -> torch.Tensor:
    """K x 2 (x, y) original pixels -> K x 2 resized pixels, per-axis scale."""
    sx, sy = _scale_factors(orig_wh, size_hw)
    return xy.float() * torch.tensor([sx, sy], dtype=torch.float32)


def _scale_box(box: torch.Tensor, orig_wh: tuple[int, int], size_hw: tuple[int, int]) -> torch.Tensor:
    """(x1, y1, x2, y2) original pixels -> resized pixels, per-axis scale."""
    sx, sy = _scale_factors(orig_wh, size_hw)
    return box.float() * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def valid_point_mask(src: np.ndarray, trg: np.ndarray) -> np.ndarray:
    """K x 2 each -> K bool: a correspondence is kept when both points are finite and non-negative
    (the PF datasets mark missing points with NaN or negative coordinates)."""
    ok_s = np.isfinite(src).all(axis=1) & (np.nan_to_num(src, nan=-1.0) >= 0).all(axis=1)
    ok_t = np.isfinite(trg).all(axis=1) & (np.nan_to_num(trg, nan=-1.0) >= 0).all(axis=1)
    return ok_s & ok_t


@dataclass
class Pair:
    """One annotated image pair, already resized.

    Attributes:
        src_image, trg_image: float 3 x H x W in [0, 1], H x W = the dataset's ``image_size``.
        src_kps, trg_kps: float K x 2, (x, y) pixels of the resized images; row k of each corresponds.
        n_kps: K, the number of real points.
        category: the dataset's category name (folder names for PF-Willow, e.g. "car(G)").
        threshold: PCK threshold in resized pixels (SPair: max(h, w) of the target box; PF-Pascal:
            max(H, W) of the target image; PF-Willow and synthetic: max(x, y) extent of the target points).
        src_id, trg_id: image ids, unique within a dataset (same id -> same pixels), for feature caching.
        src_size, trg_size: original (W, H) of the images before resizing.
        pair_id: unique within a dataset.
        extra: dataset-specific fields (see each dataset).
    """

    src_image: torch.Tensor
    trg_image: torch.Tensor
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    n_kps: int
    category: str
    threshold: float
    src_id: str
    trg_id: str
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    pair_id: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairBatch:
    """A batch of B pairs.

    Attributes:
        src_image, trg_image: B x 3 x H x W in [0, 1].
        src_kps, trg_kps: B x K x 2 (K = max n_kps of the batch), rows beyond ``n_kps[b]`` are zeros.
        n_kps: LongTensor B. threshold: FloatTensor B.
        categories, src_ids, trg_ids, pair_ids: lists of B str; src_sizes, trg_sizes: lists of (W, H);
        extra: list of B dicts.
    """

    src_image: torch.Tensor
    trg_image: torch.Tensor
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    n_kps: torch.Tensor
    threshold: torch.Tensor
    categories: list[str]
    src_ids: list[str]
    trg_ids: list[str]
    pair_ids: list[str]
    src_sizes: list[tuple[int, int]]
    trg_sizes: list[tuple[int, int]]
    extra: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.pair_ids)

    TENSORS: ClassVar[tuple[str, ...]] = ("src_image", "trg_image", "src_kps", "trg_kps", "n_kps", "threshold")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """Move the tensors to ``device`` (lists are kept); `non_blocking` overlaps the copies from pinned memory."""
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking) for name in self.TENSORS})

    def pin_memory(self) -> PairBatch:
        """The tensors in page-locked memory: a DataLoader with ``pin_memory=True`` calls this (it pins only the
        types it knows, or those with this method), so that copies to the GPU can run while it computes."""
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self.TENSORS})


def collate_pairs(pairs: Sequence[Pair]) -> PairBatch:
    """Stack pairs (all of one image size) into a PairBatch, padding keypoints with zeros to the max K."""
    if len(pairs) == 0:
        raise ValueError("collate_pairs needs at least one pair")
    k_max = max(p.n_kps for p in pairs)
    src_kps = torch.zeros(len(pairs), k_max, 2)
    trg_kps = torch.zeros(len(pairs), k_max, 2)
    for b, p in enumerate(pairs):
        src_kps[b, : p.n_kps] = p.src_kps[: p.n_kps]
        trg_kps[b, : p.n_kps] = p.trg_kps[: p.n_kps]
    return PairBatch(
        src_image=torch.stack([p.src_image for p in pairs]),
        trg_image=torch.stack([p.trg_image for p in pairs]),
        src_kps=src_kps,
        trg_kps=trg_kps,
        n_kps=torch.tensor([p.n_kps for p in pairs], dtype=torch.long),
        threshold=torch.tensor([p.threshold for p in pairs], dtype=torch.float32),
        categories=[p.category for p in pairs],
        src_ids=[p.src_id for p in pairs],
        trg_ids=[p.trg_id for p in pairs],
        pair_ids=[p.pair_id for p in pairs],
        src_sizes=[p.src_size for p in pairs],
        trg_sizes=[p.trg_size for p in pairs],
        extra=[p.extra for p in pairs],
    )


class ImageSet(Dataset):
    """Image-level view of a split: item i is (image_id, image 3 x H x W in [0, 1]), each unique image once.

    ``load(image_id)`` produces the resized image tensor; ids are the ones Pair.src_id / trg_id carry.
    """

    def __init__(self, ids: Sequence[str], load: Callable[[str], torch.Tensor]) -> None:
        self.ids = list(dict.fromkeys(ids))  # unique, first-seen order
        self._load = load

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        image_id = self.ids[i]
        return image_id, self._load(image_id)


class PairDataset(Dataset):
    """Base of the datasets: a list of pairs, a sorted ``categories`` list, and the image-level view."""

    categories: list[str]
    image_size: tuple[int, int]
    threshold_mode: str  # the standard PCK threshold (a mode of sdm.metrics.THRESHOLDS); Pair.threshold follows it
    # where distances and thresholds are measured by default: "resized" (the network's input, SD4Match) or
    # "original" (the stored image, or any frame that scales it uniformly)
    standard_frame: str = "resized"
    # False: pairs carry empty 3 x 0 x 0 images (evaluation with per-image feature caches loads images itself).
    decode_images: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    @staticmethod
    def recognises(root: Path) -> bool:
        """Whether the folder `root` holds this dataset in its official layout (`sdm.data.infer_dataset` asks
        every registered dataset)."""
        return False

    def pair_image(self, image_id: str) -> torch.Tensor:
        """The image a Pair carries: `load_image`, or an empty 3 x 0 x 0 tensor when `decode_images` is off."""
        return self.load_image(image_id) if self.decode_images else torch.zeros(3, 0, 0)

    def __getitem__(self, i: int) -> Pair:
        raise NotImplementedError

    def make_pair(
        self,
        ids: tuple[str, str],
        kps: tuple[torch.Tensor, torch.Tensor],
        sizes: tuple[tuple[int, int], tuple[int, int]],
        *,
        category: str,
        pair_id: str,
        extra: dict[str, Any] | None = None,
    ) -> Pair:
        """A Pair from (source, target) ids, resized keypoints, stored sizes and facts (`extra`: boxes, flags); the
        images through `pair_image` (so `decode_images` holds for every dataset), the threshold from the facts
        (`pair_threshold`)."""
        extra = extra or {}
        return Pair(
            src_image=self.pair_image(ids[0]), trg_image=self.pair_image(ids[1]), src_kps=kps[0], trg_kps=kps[1],
            n_kps=len(kps[0]), category=category, threshold=self.pair_threshold(kps, sizes, extra), src_id=ids[0], trg_id=ids[1],
            src_size=sizes[0], trg_size=sizes[1], pair_id=pair_id, extra=extra,
        )  # fmt: skip

    def pair_threshold(self, kps: tuple[torch.Tensor, torch.Tensor], sizes: tuple[tuple[int, int], tuple[int, int]], extra: dict[str, Any]) -> float:
        """A pair's PCK threshold in the resized input under the dataset's `threshold_mode`, from its facts
        (keypoints, boxes, sizes): the one function every threshold comes from, here and in `evaluate`
        (`sdm.metrics.threshold_of`)."""
        from sdm.metrics import pair_facts, threshold_of

        return threshold_of(pair_facts(kps[0], kps[1], extra, sizes[0], sizes[1], tuple(self.image_size), "resized"), self.threshold_mode)

    def keypoints(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Pair i's resized (src_kps K x 2, trg_kps K x 2, threshold) without decoding its images."""
        pair = decoding(self, False)[i]
        return pair.src_kps, pair.trg_kps, pair.threshold

    def image_ids(self) -> list[str]:
        """Ids of every image used by the split (src and trg), unique, in first-use order."""
        raise NotImplementedError

    def load_image(self, image_id: str) -> torch.Tensor:
        """The resized image 3 x H x W in [0, 1] that pairs carrying ``image_id`` use."""
        raise NotImplementedError

    def original_image(self, image_id: str) -> Image.Image:
        """The image as stored, before resizing (RGB), oriented as the pairs use it (PF-Pascal's "|flip" ids are
        flipped): CPM's DINOv2 input. Datasets made in memory return the image they made."""
        array = (self.load_image(image_id).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)

    def images(self) -> ImageSet:
        """The split's unique images as a Dataset of (image_id, 3 x H x W tensor)."""
        return ImageSet(self.image_ids(), self.load_image)


class FilePairDataset(PairDataset):
    """A PairDataset whose images are files (`image_file`): it reads them, and caches each file's stored size
    read from its header, which scales the annotations into the resized space. Its errors name the dataset and
    show its layout (`title`, `layout`, `download_name`)."""

    title: ClassVar[str]  # the dataset as errors name it, e.g. "SPair-71k"
    layout: ClassVar[str]  # the expected folder layout, shown when something is missing
    download_name: ClassVar[str]  # `sdm download <download_name>` fetches it
    splits: ClassVar[tuple[str, ...]] = ("test",)
    records: list[Any]  # one per pair, in the split's order

    def __len__(self) -> int:
        return len(self.records)

    def open_root(self, root: str | Path, split: str, image_size: ImageSize, category: str | None, categories: Sequence[str]) -> None:
        """Set `root`, `split` and `image_size`, after checking the split, the category (one of `categories` or
        None) and that the folder exists."""
        self.root, self.split, self.image_size = Path(root), split, as_hw(image_size)
        check_category(category, categories)
        if split not in self.splits:
            if len(self.splits) == 1:
                raise ValueError(f"{self.title} has only the {self.splits[0]!r} split, not {split!r}")
            raise ValueError(f"unknown {self.title} split {split!r}; valid: {', '.join(self.splits)}")
        if not self.root.is_dir():
            raise self.missing("root", self.root)

    def download_hint(self) -> str:
        """How to get the dataset, as errors say it."""
        return download_hint(self.download_name)

    def missing(self, what: str, path: Path) -> DatasetNotFoundError:
        """The error for a missing file or folder of this dataset: `what` it is, the layout, how to get it."""
        return missing_error(f"{self.title} {what}", path, self.layout, self.download_hint())

    def image_file(self, image_id: str) -> Path:
        """The file holding image `image_id` as stored."""
        raise NotImplementedError

    def stored_size(self, image_id: str) -> tuple[int, int]:
        """Original (W, H) of image `image_id` (its file's header, read once)."""
        path = self.image_file(image_id)
        if path not in self._stored_sizes:
            self._stored_sizes[path] = _read_size(path)
        return self._stored_sizes[path]

    @cached_property
    def _stored_sizes(self) -> dict[Path, tuple[int, int]]:  # made on first use: subclasses call no base __init__
        return {}

    def load_image(self, image_id: str) -> torch.Tensor:
        return pil_to_tensor(_read_image(self.image_file(image_id)), self.image_size)

    def original_image(self, image_id: str) -> Image.Image:
        return _read_image(self.image_file(image_id))

    def resized_points(self, xy: np.ndarray, image_id: str) -> torch.Tensor:
        """K x 2 (x, y) pixels of the stored image `image_id` -> K x 2 float pixels of the resized one."""
        return _scale_points(torch.from_numpy(xy), self.stored_size(image_id), self.image_size)

    def resized_box(self, box: np.ndarray | torch.Tensor, image_id: str) -> torch.Tensor:
        """(x1, y1, x2, y2) pixels of the stored image `image_id` -> the same box in the resized image."""
        return _scale_box(torch.as_tensor(box), self.stored_size(image_id), self.image_size)


class PairSubset:
    """At most `n` pairs of a dataset, spread evenly over it (the datasets list pairs category by category, so
    the first n pairs would cover only the first category). Behaves as the dataset for `evaluate` and `train`."""

    def __init__(self, dataset: Any, n: int | None) -> None:
        total = len(dataset)
        n = total if n is None else max(0, min(int(n), total))
        self.dataset = dataset
        self.indices = sorted({math.floor(i * total / n) for i in range(n)}) if n else []
        self.categories = dataset.categories
        self.image_size = dataset.image_size
        self.of = total  # pairs of the full split

    @property
    def decode_images(self) -> bool:
        return self.dataset.decode_images

    @decode_images.setter
    def decode_images(self, value: bool) -> None:
        self.dataset.decode_images = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):  # -> Pair
        return self.dataset[self.indices[i]]

    def keypoints(self, i: int):
        return self.dataset.keypoints(self.indices[i])

    def load_image(self, image_id: str) -> torch.Tensor:
        return self.dataset.load_image(image_id)

    def pair_image(self, image_id: str) -> torch.Tensor:
        return self.dataset.pair_image(image_id)

    def image_ids(self) -> list[str]:
        return self.dataset.image_ids()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["dataset"], name)


def load_images(dataset: Any, image_ids: Sequence[str], threads: int = 4) -> torch.Tensor:
    """`dataset.load_image` of each id, stacked N x 3 x H x W, on up to `threads` threads: Pillow lets go of Python's
    lock while it decodes and resizes, so the files of a batch are read side by side (twelve SPair-71k images at
    768 px: 7.0-8.1 ms an image one after another, 4.4-4.6 ms on two threads of this project's 2-core CPU)."""
    if threads <= 1 or len(image_ids) <= 1:
        return torch.stack([dataset.load_image(i) for i in image_ids])
    with ThreadPoolExecutor(min(threads, len(image_ids))) as pool:  # no thread outlives the call
        return torch.stack(list(pool.map(dataset.load_image, image_ids)))


def decoding(dataset: Any, on: bool) -> Any:
    """`dataset` whose pairs carry their images (`on`) or empty 3 x 0 x 0 ones: the dataset itself when its
    `decode_images` already says so, else a shallow copy with the flag set. The caller's dataset is never changed."""
    if bool(dataset.decode_images) == on:
        return dataset
    if isinstance(dataset, PairSubset):  # copy.copy trips over its __getattr__; copy the subset by hand
        view = object.__new__(PairSubset)
        view.__dict__.update(dataset.__dict__)
        view.__dict__["dataset"] = decoding(dataset.dataset, on)
        return view
    view = copy.copy(dataset)
    view.decode_images = on
    return view


def spread_subset(dataset: Any, n: int | None) -> Any:
    """`PairSubset` of n pairs spread evenly and deterministically over the dataset (every len / n-th pair, so
    every category is covered); the dataset itself when n is None or covers it."""
    return dataset if n is None or n >= len(dataset) else PairSubset(dataset, n)


__all__ = [
    "FilePairDataset",
    "ImageSet",
    "ImageSize",
    "OriginalLoader",
    "Pair",
    "PairBatch",
    "PairDataset",
    "PairSubset",
    "as_hw",
    "collate_pairs",
    "decoding",
    "load_images",
    "pil_to_tensor",
    "spread_subset",
    "valid_point_mask",
]
