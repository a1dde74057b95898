"""PF-Willow (Ham et al., "Proposal Flow", CVPR 2016): 900 test pairs, 10 classes, 10 points per image."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import FilePairDataset, ImageSize, Pair, valid_point_mask
from .errors import AnnotationError, check_category, read_csv
from .layouts import PFWILLOW_LAYOUT

# The csv's image paths start with this folder name, which stands for PF-dataset/ next to the csv.
_CSV_PREFIX = "PF-WILLOW"
IMAGE_DIR = "PF-dataset"
_N_POINTS = 10


def category_label(name: str) -> str:
    """Category name for text prompts: drops PF-Willow's condition suffix, "car(G)" -> "car",
    "motorbike(S)" -> "motorbike", "winebottle(woC)" -> "winebottle"; other names are returned as is."""
    return re.sub(r"\s*\([^()]*\)$", "", name).strip()


@dataclass(frozen=True)
class WillowRecord:
    """One csv row: images relative to the image folder ("<class>/<name>.png"), points 10 x 2 (x, y)."""

    row: int
    src: str
    trg: str
    category: str
    src_kps: np.ndarray
    trg_kps: np.ndarray


def parse_pfwillow_csv(csv_path: Path) -> list[WillowRecord]:
    """Read PF-Willow's test_pairs.csv into records (original-image pixel coordinates)."""
    cols = [f"{a}{i}" for a in ("XA", "YA", "XB", "YB") for i in range(1, _N_POINTS + 1)]
    df = read_csv(csv_path, ["imageA", "imageB", *cols])
    records = []
    for row_no, row in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
        paths = []
        for col in ("imageA", "imageB"):
            parts = Path(str(getattr(row, col))).parts
            if len(parts) != 3 or parts[0] != _CSV_PREFIX:
                raise AnnotationError(
                    f"{csv_path}, line {row_no}, field {col}: expected {_CSV_PREFIX}/<class>/<file>, got {getattr(row, col)!r}"
                )
            paths.append(parts)
        if paths[0][1] != paths[1][1]:
            raise AnnotationError(f"{csv_path}, line {row_no}: imageA and imageB are of different classes")
        try:
            vals = {c: float(getattr(row, c)) for c in cols}
        except (TypeError, ValueError) as err:
            raise AnnotationError(f"{csv_path}, line {row_no}: non-numeric keypoint field ({err})") from err

        def points(x: str, y: str, vals: dict[str, float] = vals) -> np.ndarray:
            return np.array([[vals[f"{x}{i}"], vals[f"{y}{i}"]] for i in range(1, _N_POINTS + 1)])

        records.append(
            WillowRecord(
                row=row_no - 2,
                src=f"{paths[0][1]}/{paths[0][2]}",
                trg=f"{paths[1][1]}/{paths[1][2]}",
                category=paths[0][1],
                src_kps=points("XA", "YA"),
                trg_kps=points("XB", "YB"),
            )
        )
    return records


class PFWillow(FilePairDataset):
    """PF-Willow test pairs as Pair samples.

    ``threshold`` = max(x extent, y extent) of the target keypoints after resizing. Ids: src_id/trg_id
    "<class>/<stem>" (e.g. "car(G)/Cars_006a"), pair_id "<csv row, from 0>:<src_id>-><trg_id>". ``extra`` is empty.
    """

    threshold_mode = "kps-extent"  # the standard PCK threshold (sdm.metrics.THRESHOLDS)
    title, layout, download_name = "PF-Willow", PFWILLOW_LAYOUT, "pfwillow"
    split = "test"  # PF-Willow has no other split

    def __init__(self, root: str | Path, image_size: ImageSize = 768, category: str | None = None, *, split: str = "test") -> None:
        self.open_root(root, split, image_size, None, ())  # the categories are the csv's
        csv_path = self.root / "test_pairs.csv"
        if not csv_path.is_file():
            raise self.missing("pair list", csv_path)
        records = parse_pfwillow_csv(csv_path)
        self.all_categories = sorted({r.category for r in records})
        check_category(category, self.all_categories)
        self.records = [r for r in records if category is None or r.category == category]
        self.categories = sorted({r.category for r in self.records})

    @staticmethod
    def recognises(root: Path) -> bool:
        return (root / "PF-dataset").is_dir()

    def image_file(self, image_id: str) -> Path:
        return self.root / IMAGE_DIR / f"{image_id}.png"

    @staticmethod
    def _id(rel: str) -> str:
        return str(Path(rel).with_suffix(""))

    def image_ids(self) -> list[str]:
        ids = [self._id(r.src) for r in self.records] + [self._id(r.trg) for r in self.records]
        return list(dict.fromkeys(ids))

    def _points(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.records[i]
        keep = valid_point_mask(r.src_kps, r.trg_kps)
        src_kps = self.resized_points(r.src_kps[keep], self._id(r.src))
        trg_kps = self.resized_points(r.trg_kps[keep], self._id(r.trg))
        if len(trg_kps) < 2:
            raise AnnotationError(f"PF-Willow pair {i} ({r.src} -> {r.trg}): fewer than 2 valid keypoints")
        return src_kps, trg_kps

    def __getitem__(self, i: int) -> Pair:
        r = self.records[i]
        src_kps, trg_kps = self._points(i)
        src_id, trg_id = self._id(r.src), self._id(r.trg)
        sizes = (self.stored_size(src_id), self.stored_size(trg_id))
        return self.make_pair((src_id, trg_id), (src_kps, trg_kps), sizes, category=r.category, pair_id=f"{r.row}:{src_id}->{trg_id}")


__all__ = [
    "IMAGE_DIR",
    "PFWillow",
    "category_label",
    "parse_pfwillow_csv",
]
