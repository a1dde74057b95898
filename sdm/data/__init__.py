"""Datasets of annotated image pairs (SPair-71k, PF-Pascal, PF-Willow, synthetic) and their downloader.

Every dataset yields ``Pair`` samples (images resized to ``image_size``, keypoints scaled per axis,
the dataset's PCK threshold in that resized space); ``collate_pairs`` batches them.
"""

from __future__ import annotations

from sdm.lazy import lazy_names

# public name -> the module that defines it; loaded on first use (PEP 562), so that `sdm download` and the
# command line's parser need no torch
_HOMES = {
    "CUB200": "sdm.data.cub",
    "CUB_LAYOUT": "sdm.data.layouts",
    "DATASETS": "sdm.data.registry",
    "PFPASCAL_CATEGORIES": "sdm.data.pfpascal",
    "PHOTOS": "sdm.data.synthetic",
    "SPAIR_CATEGORIES": "sdm.data.spair",
    "SYNTHETIC_SPLITS": "sdm.data.registry",
    "AnnotationError": "sdm.data.errors",
    "DatasetName": "sdm.config",
    "DatasetNotFoundError": "sdm.data.errors",
    "FilePairDataset": "sdm.data.base",
    "ImageReadError": "sdm.data.errors",
    "ImageSet": "sdm.data.base",
    "ImageSize": "sdm.data.base",
    "OriginalLoader": "sdm.data.base",
    "PFPascal": "sdm.data.pfpascal",
    "PFWillow": "sdm.data.pfwillow",
    "Pair": "sdm.data.base",
    "PairBatch": "sdm.data.base",
    "PairDataset": "sdm.data.base",
    "PairSubset": "sdm.data.base",
    "SPair71k": "sdm.data.spair",
    "SPairU": "sdm.data.spair_u",
    "SyntheticPairs": "sdm.data.synthetic",
    "apply_homography": "sdm.data.synthetic",
    "category_label": "sdm.data.pfwillow",
    "collate_pairs": "sdm.data.base",
    "dataset_record": "sdm.data.registry",
    "decoding": "sdm.data.base",
    "infer_dataset": "sdm.data.registry",
    "load_dataset": "sdm.data.registry",
    "parse_pfpascal_csv": "sdm.data.pfpascal",
    "parse_pfwillow_csv": "sdm.data.pfwillow",
    "parse_spair_annotation": "sdm.data.spair",
    "read_cub": "sdm.data.cub",
    "read_pfpascal_mat": "sdm.data.pfpascal",
    "spread_subset": "sdm.data.base",
}
__all__ = [
    "CUB200",
    "CUB_LAYOUT",
    "DATASETS",
    "PFPASCAL_CATEGORIES",
    "PHOTOS",
    "SPAIR_CATEGORIES",
    "SYNTHETIC_SPLITS",
    "AnnotationError",
    "DatasetName",
    "DatasetNotFoundError",
    "FilePairDataset",
    "ImageReadError",
    "ImageSet",
    "ImageSize",
    "OriginalLoader",
    "PFPascal",
    "PFWillow",
    "Pair",
    "PairBatch",
    "PairDataset",
    "PairSubset",
    "SPair71k",
    "SPairU",
    "SyntheticPairs",
    "apply_homography",
    "category_label",
    "collate_pairs",
    "dataset_record",
    "decoding",
    "infer_dataset",
    "load_dataset",
    "parse_pfpascal_csv",
    "parse_pfwillow_csv",
    "parse_spair_annotation",
    "read_cub",
    "read_pfpascal_mat",
    "spread_subset",
]


__getattr__, __dir__ = lazy_names("sdm.data", _HOMES, globals())
