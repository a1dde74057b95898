"""AP-10K as GeoAware-SC (github Junyi42/GeoAware-SC, 99fd6b6) turns it into a correspondence benchmark: animal
images of 54 species in 23 families with 17 keypoints, paired within a species ("intra-species", splits trn, val,
test), across the species of a family ("cross-species": val_cross_species, test_cross_species) and across families
("cross-family": val_cross_family, test_cross_family), the three `AP10K_EVAL_SUBSET` settings.

The pairs are what Junyi42/GeoAware-SC `prepare_ap10k.ipynb` writes from the AP-10K release (`data/prepare_ap10k.sh`
downloads it; `data/ap-10k_is_crowd.txt` lists the crowded images it drops): one image annotation per image with
its `bbox` [left, top, width, height], `keypoints` (17 x (x, y, v), v = 2 visible), `width`, `height`, and pair files
naming two image annotations, kept when at least 3 keypoints are visible in both. That notebook draws the pairs
with Python's `random` over `os.walk` order, which depends on the file system: pair lists made on two machines
can differ, so share the prepared PairAnnotation folder with a result.

A pair's points are the keypoints visible in both images (Junyi42/GeoAware-SC `pck_train.py:123`), in keypoint
order; the threshold is max(w, h) of the target box (Junyi42/GeoAware-SC `utils/utils_dataset.py:192-193`), measured after their
aspect-preserving resize with padding, which scales distances and threshold alike: the original frame here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdm.metrics import spair_threshold

from .base import FilePairDataset, ImageSize, Pair
from .errors import AnnotationError, check_category
from .geoaware import AP10K_GEO_AWARE, GeoAwareReading, GeoPair, subset_flags

AP10K_LAYOUT = """\
<root>/                                    (data/ap-10k as GeoAware-SC's prepare_ap10k.ipynb leaves it)
  JPEGImages/<family>/<species>/<image>.jpg
  ImageAnnotation/<family>/<species>/<image>.json   bbox [l, t, w, h], keypoints 17 x (x, y, v), width, height
  PairAnnotation/<split>/<src>-<trg>:<category>.json   src_json_path, trg_json_path (paths ending in
      ImageAnnotation/<family>/<species>/<image>.json); <split>: trn, val, test (intra-species),
      val_cross_species, test_cross_species (category: the family), val_cross_family, test_cross_family ("all")
"""
AP10K_KEYPOINTS = 17


@dataclass(frozen=True)
class _Record:
    name: str
    category: str
    src: str  # image ids "<family>/<species>/<image>"
    trg: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray  # x1, y1, x2, y2
    trg_bbox: np.ndarray
    kps_ids: tuple[int, ...]  # each point's keypoint id (0..16)


class AP10K(FilePairDataset):
    """AP-10K pairs of one split (see the module's docstring for the splits of the three settings), optionally one
    category (a species for the intra-species splits, a family for cross-species, "all" for cross-family).

    Ids: "<family>/<species>/<image>"; pair_id the pair file's name. ``extra``: src_bbox, trg_bbox (x1 y1 x2 y2, resized
    pixels). The standard threshold is max(h, w) of the target box, in the original frame.
    """

    threshold_mode = "trg-bbox"
    standard_frame = "original"
    title, layout, download_name = "AP-10K", AP10K_LAYOUT, None
    splits = ("trn", "val", "test", "val_cross_species", "test_cross_species", "val_cross_family", "test_cross_family")

    def download_hint(self) -> str:
        return ("Download AP-10K with GeoAware-SC's data/prepare_ap10k.sh (a Google Drive file) and build the pairs with "
                "its prepare_ap10k.ipynb (github Junyi42/GeoAware-SC); sdm reads the folder that notebook leaves.")  # fmt: skip

    def __init__(self, root: str | Path, split: str = "test", category: str | None = None, image_size: ImageSize = 768) -> None:
        self.open_root(root, split, image_size, None, [])
        pair_dir = self.root / "PairAnnotation" / split
        if not pair_dir.is_dir():
            raise self.missing(f"{split} pairs", pair_dir)
        paths = sorted(pair_dir.glob("*.json"))
        found = sorted({p.stem.rsplit(":", 1)[-1] for p in paths})
        check_category(category, found)
        self.image_root = self.root
        self._images: dict[str, dict[str, Any]] = {}
        self.records = [self._record(p) for p in paths if category is None or p.stem.rsplit(":", 1)[-1] == category]
        self.categories = sorted({r.category for r in self.records})

    @staticmethod
    def recognises(root: Path) -> bool:
        # families hold species folders: JPEGImages/<family>/<species>/ (SPair-71k's JPEGImages/<category>/ holds images)
        families = [p for p in (root / "JPEGImages").glob("*") if p.is_dir()] if (root / "PairAnnotation").is_dir() else []
        return any(q.is_dir() for p in families[:3] for q in p.iterdir())

    def image_file(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def image_ids(self) -> list[str]:
        return list(dict.fromkeys(i for r in self.records for i in (r.src, r.trg)))

    def _image(self, path_text: str, pair: Path) -> tuple[str, dict[str, Any]]:
        """The image id and annotation a pair file names (a path ending in ImageAnnotation/<family>/<species>/<x>.json)."""
        parts = Path(path_text).parts
        if "ImageAnnotation" not in parts or len(parts) - parts.index("ImageAnnotation") != 4:
            raise AnnotationError(f"{pair}: {path_text!r} does not end in ImageAnnotation/<family>/<species>/<image>.json")
        image_id = "/".join(parts[-3:]).removesuffix(".json")
        if image_id not in self._images:
            path = self.root / "ImageAnnotation" / f"{image_id}.json"
            if not path.is_file():
                raise self.missing(f"image annotation named by {pair.name}", path)
            try:
                ann = json.loads(path.read_text())
                kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(AP10K_KEYPOINTS, 3)
                left, top, width, height = (float(v) for v in ann["bbox"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise AnnotationError(f"{path}: expected 'keypoints' (17 x 3 numbers) and 'bbox' [l, t, w, h] ({err})") from err
            self._images[image_id] = {"kps": kps, "bbox": np.asarray([left, top, left + width, top + height])}
        return image_id, self._images[image_id]

    def _record(self, path: Path) -> _Record:
        try:
            ann = json.loads(path.read_text())
            src_path, trg_path = ann["src_json_path"], ann["trg_json_path"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise AnnotationError(f"{path}: expected 'src_json_path' and 'trg_json_path' ({err})") from err
        (src, s), (trg, t) = self._image(src_path, path), self._image(trg_path, path)
        both = (s["kps"][:, 2] > 0) & (t["kps"][:, 2] > 0)  # visible in both (v / 2 > 0)
        ids = tuple(int(k) for k in np.flatnonzero(both))
        return _Record(path.stem, path.stem.rsplit(":", 1)[-1], src, trg, s["kps"][both, :2], t["kps"][both, :2], s["bbox"], t["bbox"], ids)

    def geo_aware_flags(self, reading: GeoAwareReading = "authors") -> dict[str, list[bool]]:
        """pair_id -> for each of the pair's points, whether it is in GeoAware-SC's geometry-aware subset
        (`sdm.data.geoaware`, the AP-10K groups; the ids a category uses: those visible in any of its images)."""
        visible = {i: set(np.flatnonzero(self._images[i]["kps"][:, 2] > 0).tolist()) for i in self.image_ids()}
        pairs = [GeoPair(r.name, r.category, visible[r.src], visible[r.trg], r.kps_ids) for r in self.records]
        return subset_flags(pairs, lambda _category: AP10K_GEO_AWARE, reading)

    def __getitem__(self, i: int) -> Pair:
        r = self.records[i]
        src_box, trg_box = self.resized_box(r.src_bbox, r.src), self.resized_box(r.trg_bbox, r.trg)
        if float(spair_threshold(torch.as_tensor(trg_box))) <= 0:
            raise AnnotationError(f"AP-10K pair {r.name}: the target's bbox is empty ({r.trg_bbox.tolist()})")
        return self.make_pair(
            (r.src, r.trg), (self.resized_points(r.src_kps, r.src), self.resized_points(r.trg_kps, r.trg)),
            (self.stored_size(r.src), self.stored_size(r.trg)), category=r.category, pair_id=r.name,
            extra={"src_bbox": src_box, "trg_bbox": trg_box},
        )  # fmt: skip


__all__ = ["AP10K", "AP10K_KEYPOINTS", "AP10K_LAYOUT"]
