"""Stable Diffusion bundles: real weights from the hub or a folder, and random-weight builds.

`load_stable_diffusion` loads the five parts the matcher needs with diffusers/transformers
`from_pretrained`. `tiny_stable_diffusion` builds the same classes from tiny configs (tests, CI, the
offline demo) and `sd21_architecture` the full-size SD2-1 architecture with random weights (GPU
benchmarks: it costs exactly what the real model costs).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdm.config import DEFAULT_MODEL
from sdm.text import ClipText, TextConditioning

# The paper's repository id; its weights were withdrawn in November 2025, DEFAULT_MODEL (a mirror) holds them.
WITHDRAWN_MODELS = {"stabilityai/stable-diffusion-2-1": DEFAULT_MODEL}

# SD2-1's noise schedule (its scheduler_config.json); the scheduler class only decides how noise is added.
_SD21_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="v_prediction",
    steps_offset=1,
)


class RandomWeightsWarning(UserWarning):
    """A model with random weights was built: what it computes only shows that the pipeline runs."""


@dataclass
class StableDiffusion:
    """The frozen parts of a Stable Diffusion model that feature extraction needs.

    All modules are in eval mode with `requires_grad=False`; gradients can still flow *through* them
    to inputs (learned prompts).
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    name: str = "unnamed"
    random_weights: bool = False
    _text: ClipText | None = field(default=None, init=False, repr=False)

    # The subfolders `from_pretrained` reads (a model on another pipeline subclasses this class and names its own).
    PARTS: ClassVar[tuple[str, ...]] = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")

    @classmethod
    def from_pretrained(cls, model: str, dtype: torch.dtype, **kwargs: Any) -> StableDiffusion:
        """The parts of a hub id or a folder in diffusers layout (`kwargs`: `local_files_only`); on the CPU."""
        return cls(
            AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs),
            UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs),
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kwargs),
            CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
            DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs),
            name=model,
        )

    def __post_init__(self) -> None:
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()
        if self.random_weights:  # once per model: every feature, match and PCK it gives is meaningless
            warnings.warn(
                f"{self.name} has random weights: its features, matches and PCK only show that the pipeline runs "
                "(results record random_weights: true)", RandomWeightsWarning, stacklevel=4,
            )  # fmt: skip

    @property
    def text(self) -> TextConditioning:
        """The text side prompts go through (`sdm.text.ClipText` of `text_encoder` and `tokenizer`; rebuilt when
        either is replaced)."""
        if self._text is None or self._text.encoder is not self.text_encoder or self._text.tokenizer is not self.tokenizer:
            self._text = ClipText(self.text_encoder, self.tokenizer)
        return self._text

    def modules(self) -> list[torch.nn.Module]:
        """The frozen modules: VAE, UNet and the text side's (moved, cast and fingerprinted together)."""
        return [self.vae, self.unet, *self.text.modules()]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def embed_dim(self) -> int:
        """Width D of the text encoder's token vectors (1024 for SD2-1)."""
        return self.text.width

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Moves all modules in place and returns self."""
        for module in self.modules():
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
            if device is not None:
                module.to(device=device)
        return self


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    # The authors ran under fp16 autocast; half precision weights give the same features for far less memory.
    return torch.float16 if device.type == "cuda" else torch.float32


def _in_hub_cache(model: str) -> bool:
    """Whether every part of a hub model is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    config = {"tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    parts = [f"{part}/{config.get(part, 'config.json')}" for part in StableDiffusion.PARTS]
    try:
        return all(isinstance(try_to_load_from_cache(model, part), str) for part in parts)
    except Exception:  # an id the cache cannot even parse: let from_pretrained explain
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so that an offline machine fails at once instead of after a
    minute of download retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _load_error(model: str, err: Exception) -> RuntimeError:
    lines = [f"Could not load Stable Diffusion from {model!r}: {type(err).__name__}: {err}"]
    if model in WITHDRAWN_MODELS:
        lines.append(
            f"{model!r} was withdrawn from the Hugging Face Hub; the same weights are mirrored at "
            f"{WITHDRAWN_MODELS[model]!r}: pass model={WITHDRAWN_MODELS[model]!r}."
        )
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
    if looks_local or Path(model).expanduser().exists():
        lines.append(
            "A local folder must hold the diffusers layout: vae/, unet/, text_encoder/, tokenizer/, scheduler/ "
            "(as written by `StableDiffusionPipeline.save_pretrained`)."
        )
    else:
        lines.append(
            "If this machine is offline, download the weights where there is network "
            f"(`hf download {DEFAULT_MODEL}`) and either copy the Hugging Face cache here and set "
            "HF_HUB_OFFLINE=1, or pass the downloaded folder as `model`. "
            "For a quick offline check use `sdm.tiny_stable_diffusion()` (random weights)."
        )
    return RuntimeError("\n".join(lines))


def load_stable_diffusion(
    model: str = DEFAULT_MODEL,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
) -> StableDiffusion:
    """Loads VAE, UNet, text encoder, tokenizer and noise schedule of a diffusers model.

    Args:
        model: a Hugging Face Hub id (default: the SD2-1 mirror) or a local folder in diffusers layout.
        device: where to put the modules (default: CUDA when available, else CPU).
        dtype: weight dtype (default: float16 on CUDA, float32 on CPU).
        local_files_only: never touch the network, only the local cache or folder.

    Raises:
        RuntimeError: naming the model, the reason, and what to do (mirror, local folder, HF_HUB_OFFLINE).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or _default_dtype(device)
    model = str(model)
    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.is_dir():
        raise _load_error(model, FileNotFoundError(f"no folder at {path.resolve()}"))
    if path.is_dir():
        model = str(path)
    kwargs: dict[str, Any] = dict(local_files_only=local_files_only)
    if not path.is_dir() and not local_files_only:
        if _in_hub_cache(model):
            kwargs["local_files_only"] = True  # everything is cached: no network round trips
        elif not _hub_reachable():
            raise _load_error(model, ConnectionError("the Hugging Face Hub cannot be reached and the model is not in the local cache"))
    try:
        sd = StableDiffusion.from_pretrained(model, dtype, **kwargs)
    except Exception as err:  # hub, network and file errors come in many classes; all get the same advice
        raise _load_error(model, err) from err
    return sd.to(device)


def load_model(model: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
    """By name, as the CLI and the notebooks take it: "tiny" -> `tiny_stable_diffusion()` (random weights, offline),
    anything else (hub id or folder) -> `load_stable_diffusion` (dtype None: float16 on CUDA, float32 on CPU)."""
    if model == "tiny":
        return tiny_stable_diffusion(device=device, dtype=dtype)
    return load_stable_diffusion(model, device=device, dtype=dtype)


def _tiny_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A working byte-level CLIP tokenizer built in memory (no download): every byte is a token.

    Its pad token is "!" as in SD2-1's tokenizer. Vocabulary size: `TINY_VOCAB_SIZE`.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = [("p", "h"), ("o", "t"), ("a", "r</w>"), ("o", "f</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=model_max_length)


TINY_VOCAB_SIZE = 2 * 256 + 4 + 2


def _text_config(width: int, layers: int, heads: int, ffn: int, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=width,
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=0,
    )


def _unet(channels: tuple[int, ...], heads: tuple[int, ...], cross_dim: int, layers: int, groups: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=layers,
        attention_head_dim=heads,  # diffusers' name for the number of heads in SD2 configs
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=groups,
    )


def _vae(channels: tuple[int, ...], layers: int, groups: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=768,
        scaling_factor=0.18215,
    )


def _build(
    name: str,
    seed: int,
    vae: tuple[tuple[int, ...], int, int],
    unet: Callable[[], UNet2DConditionModel],
    text: tuple[int, int, int, int, int],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    scheduler: dict[str, Any] = _SD21_SCHEDULER,
) -> StableDiffusion:
    """A model of random weights drawn from `seed` (the global generator is restored afterwards)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sd = StableDiffusion(
            vae=_vae(*vae),
            unet=unet(),
            text_encoder=CLIPTextModel(_text_config(*text)),
            tokenizer=_tiny_tokenizer(),
            scheduler=DDPMScheduler(**scheduler),
            name=name,
            random_weights=True,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    return sd.to(device or "cpu", dtype or torch.float32)


def tiny_stable_diffusion(
    seed: int = 0, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> StableDiffusion:
    """SD2-1's classes and block layout at toy width, with random weights (deterministic per seed).

    UNet channels (32, 32, 64, 64), so the default feature block `up_blocks[1]` gives 64 channels at 1/16
    of the image size; text width D = 32; byte-level tokenizer. Defaults to CPU, float32.
    """
    return _build(
        "tiny",
        seed,
        vae=((8, 16, 16, 16), 1, 4),
        unet=lambda: _unet((32, 32, 64, 64), (2, 2, 4, 4), 32, 1, 8),
        text=(32, 2, 4, 64, TINY_VOCAB_SIZE),
        device=device,
        dtype=dtype,
    )


_SD14_SCHEDULER: dict[str, Any] = {**_SD21_SCHEDULER, "prediction_type": "epsilon"}


def sd14_architecture(
    seed: int = 0, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> StableDiffusion:
    """The full-size Stable Diffusion 1.4 VAE, UNet and text encoder (CLIP ViT-L/14 text, 768 wide), random
    weights: the model of Hedlin et al.'s tables at its real cost. For benchmarks only (tokenizer: the tiny one)."""

    def unet() -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
            norm_num_groups=32,
        )

    return _build(
        "sd14-architecture", seed, vae=((128, 256, 512, 512), 2, 32), unet=unet, text=(768, 12, 12, 3072, 49408),
        device=device, dtype=dtype, scheduler=_SD14_SCHEDULER,
    )


def sd21_architecture(
    seed: int = 0, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> StableDiffusion:
    """The full-size SD2-1 VAE, UNet and text encoder (865M + 84M + 340M parameters), random weights.

    Configs follow SD2-1's published ones; the tokenizer is the tiny byte-level one (ids fit the
    49,408-token embedding). Built on CPU in float32 then moved; for benchmarks only.
    """
    return _build(
        "sd21-architecture",
        seed,
        vae=((128, 256, 512, 512), 2, 32),
        unet=lambda: _unet((320, 640, 1280, 1280), (5, 10, 20, 20), 1024, 2, 32),
        text=(1024, 23, 16, 4096, 49408),
        device=device,
        dtype=dtype,
    )


__all__ = [
    "TINY_VOCAB_SIZE",
    "WITHDRAWN_MODELS",
    "RandomWeightsWarning",
    "StableDiffusion",
    "default_device",
    "load_model",
    "load_stable_diffusion",
    "sd14_architecture",
    "sd21_architecture",
    "tiny_stable_diffusion",
]
