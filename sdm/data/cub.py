"""CUB-200-2011 bird parts as image pairs, the benchmark of Hedlin et al. (NeurIPS 2023), with their protocol
(github ubc-vision/LDM_correspondences, eval/cub2011.py at 97e3246):

- test images (``train_test_split.txt`` flag 0) of the first `num_classes` classes (1-3 in their tables);
- every unordered pair of images of a class, ``itertools.combinations`` over ``images.txt`` order, so the
  source is the image listed first;
- the parts visible in both images, ordered by part id;
- images squashed to the input size (aspect ratio not kept), points scaled per axis;
- threshold: max(w, h) of the *target* bounding box times W_input / W_target: their code scales both box sides
  by the x factor (mode "trg-bbox-xscale"); the standard per-axis box threshold is "trg-bbox".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import FilePairDataset, ImageSize, Pair
from .errors import AnnotationError, check_category, missing_root_error
from .layouts import CUB_LAYOUT


@dataclass(frozen=True)
class CubImage:
    image_id: str  # CUB's numeric id, as text
    path: str  # relative to images/, e.g. "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    class_id: int
    parts: np.ndarray  # P x 4: part id, x, y, visible (ordered by part id)
    bbox: tuple[float, float, float, float]  # x, y, width, height (original pixels)


def _rows(path: Path, fields: int, root: Path) -> list[list[str]]:
    if not path.is_file():
        raise missing_root_error("CUB-200-2011 file", path, CUB_LAYOUT, "cub")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < fields:
            raise AnnotationError(f"{path}, line {line_no}: {len(parts)} fields, expected {fields}")
        rows.append(parts)
    return rows


def read_cub(root: str | Path) -> dict[str, CubImage]:
    """Every image of the CUB-200-2011 folder `root` with its class, parts and box, keyed by image id (in
    images.txt order)."""
    root = Path(root)
    if not root.is_dir():
        raise missing_root_error("CUB-200-2011 root", root, CUB_LAYOUT, "cub")
    names = {r[0]: r[1] for r in _rows(root / "images.txt", 2, root)}
    labels = {r[0]: int(r[1]) for r in _rows(root / "image_class_labels.txt", 2, root)}
    boxes = {r[0]: tuple(float(v) for v in r[1:5]) for r in _rows(root / "bounding_boxes.txt", 5, root)}
    parts: dict[str, list[tuple[float, ...]]] = {}
    for r in _rows(root / "parts" / "part_locs.txt", 5, root):
        parts.setdefault(r[0], []).append((float(r[1]), float(r[2]), float(r[3]), float(r[4])))
    images = {}
    for image_id, path in names.items():
        if image_id not in labels or image_id not in boxes:
            raise AnnotationError(f"{root}: image {image_id} ({path}) has no class label or bounding box")
        found = np.array(sorted(parts.get(image_id, [])), dtype=np.float64).reshape(-1, 4)
        images[image_id] = CubImage(image_id, path, labels[image_id], found, boxes[image_id])  # type: ignore[arg-type]
    return images


class CUB200(FilePairDataset):
    """CUB-200-2011 test pairs under Hedlin et al.'s protocol (module docstring).

    Categories are the class folder names ("001.Black_footed_Albatross"). Ids: src_id/trg_id the image's path
    without extension; pair_id "<index>:<src_id>-><trg_id>". ``extra`` holds src_bbox / trg_bbox (x1, y1, x2, y2,
    resized pixels) and "parts" (the part ids of the points).
    """

    title, layout, download_name, splits = "CUB-200-2011", CUB_LAYOUT, "cub", ("test", "trn")  # train_test_split.txt
    threshold_mode = "trg-bbox-xscale"  # Hedlin et al.'s (eval/cub2011.py:133-137, called at :106); "trg-bbox" is the standard

    def __init__(
        self, root: str | Path, split: str = "test", image_size: ImageSize = 512, category: str | None = None, num_classes: int = 3
    ) -> None:
        self.open_root(root, split, image_size, None, ())  # the categories are the chosen classes' folders
        images = read_cub(self.root)
        flags = {r[0]: r[1] == "1" for r in _rows(self.root / "train_test_split.txt", 2, self.root)}
        chosen = [im for im in images.values() if flags.get(im.image_id) == (split == "trn") and im.class_id <= num_classes]
        self.all_categories = sorted({im.path.split("/")[0] for im in chosen})
        check_category(category, self.all_categories)
        self.images = {im.image_id: im for im in chosen}
        self.pairs: list[tuple[CubImage, CubImage]] = []
        for class_id in range(1, num_classes + 1):
            members = [im for im in chosen if im.class_id == class_id]
            self.pairs += list(itertools.combinations(members, 2))  # images.txt order: source = listed first
        if category is not None:
            self.pairs = [p for p in self.pairs if p[0].path.split("/")[0] == category]
        self.categories = sorted({p[0].path.split("/")[0] for p in self.pairs})
        self._by_id = {self._id(im.path): im for im in chosen}

    @staticmethod
    def recognises(root: Path) -> bool:
        return (root / "parts" / "part_locs.txt").is_file()

    def __len__(self) -> int:
        return len(self.pairs)

    @staticmethod
    def _id(rel: str) -> str:
        return str(Path(rel).with_suffix(""))

    def image_file(self, image_id: str) -> Path:
        return self.root / "images" / self._by_id[image_id].path

    def _size(self, image: CubImage) -> tuple[int, int]:
        return self.stored_size(self._id(image.path))

    def image_ids(self) -> list[str]:
        return list(dict.fromkeys(self._id(im.path) for pair in self.pairs for im in pair))

    def _points(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src, trg = self.pairs[i]
        vis_src = {int(p[0]): p[1:3] for p in src.parts if p[3] > 0}
        vis_trg = {int(p[0]): p[1:3] for p in trg.parts if p[3] > 0}
        both = sorted(set(vis_src) & set(vis_trg))  # part-id order, as the code's boolean mask keeps it
        if len(both) < 1:
            raise AnnotationError(f"CUB pair {i} ({src.path} -> {trg.path}): no part visible in both images")
        return np.array([vis_src[k] for k in both]), np.array([vis_trg[k] for k in both]), np.array(both)

    def __getitem__(self, i: int) -> Pair:
        src, trg = self.pairs[i]
        s, t, _ = self._points(i)
        src_kps, trg_kps = self.resized_points(s, self._id(src.path)), self.resized_points(t, self._id(trg.path))
        src_id, trg_id = self._id(src.path), self._id(trg.path)
        box = lambda im: self.resized_box(torch.tensor([im.bbox[0], im.bbox[1], im.bbox[0] + im.bbox[2], im.bbox[1] + im.bbox[3]]), self._id(im.path))  # noqa: E731
        return self.make_pair(
            (src_id, trg_id), (src_kps, trg_kps), (self._size(src), self._size(trg)), category=src.path.split("/")[0],
            pair_id=f"{i}:{src_id}->{trg_id}",
            extra={"src_bbox": box(src), "trg_bbox": box(trg), "parts": self._points(i)[2].tolist()},
        )  # fmt: skip


__all__ = [
    "CUB200",
    "CubImage",
    "read_cub",
]
