"""Datasets of annotated image pairs (SPair-71k, PF-Pascal, PF-Willow, synthetic) and their downloader.

Every dataset yields ``Pair`` samples (images resized to ``image_size``, keypoints scaled per axis,
the dataset's PCK threshold in that resized space); ``collate_pairs`` batches them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .base import (
    AnnotationError,
    DatasetNotFoundError,
    ImageReadError,
    ImageSet,
    ImageSize,
    Pair,
    PairBatch,
    PairDataset,
    collate_pairs,
)
from .pfpascal import PFPASCAL_CATEGORIES, PFPascal, parse_pfpascal_csv, read_pfpascal_mat
from .pfwillow import PFWillow, category_label, parse_pfwillow_csv
from .spair import SPAIR_CATEGORIES, SPair71k, parse_spair_annotation

DatasetName = Literal["spair", "pfpascal", "pfwillow"]
DATASETS: dict[str, type[PairDataset]] = {"spair": SPair71k, "pfpascal": PFPascal, "pfwillow": PFWillow}


def load_dataset(
    name: DatasetName,
    root: str | Path | None = None,
    split: str = "test",
    image_size: ImageSize = 768,
    category: str | None = None,
) -> PairDataset:
    """Build a dataset by registry name. PF-Willow has only the test split."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (see data/README.md)")
    if name == "pfwillow":
        if split != "test":
            raise ValueError(f"PF-Willow has only the 'test' split, not {split!r}")
        return PFWillow(root, image_size=image_size, category=category)
    return DATASETS[name](root, split=split, image_size=image_size, category=category)


__all__ = [
    "DATASETS",
    "PFPASCAL_CATEGORIES",
    "SPAIR_CATEGORIES",
    "AnnotationError",
    "DatasetName",
    "DatasetNotFoundError",
    "ImageReadError",
    "ImageSet",
    "ImageSize",
    "PFPascal",
    "PFWillow",
    "Pair",
    "PairBatch",
    "PairDataset",
    "SPair71k",
    "category_label",
    "collate_pairs",
    "load_dataset",
    "parse_pfpascal_csv",
    "parse_pfwillow_csv",
    "parse_spair_annotation",
    "read_pfpascal_mat",
]
