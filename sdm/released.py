"""The authors' released prompts (pretrained_prompts.zip of github ActiveVisionLab/SD4Match): names, listing and
import into sdm's prompt modules."""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sdm.encoders import PromptEncoders
from sdm.features import SDFeaturizer
from sdm.prompt_files import check_fits, load_state
from sdm.prompts import ClassPrompt, CPMConfig, PromptModule, SinglePrompt, build_prompt

# Folder names of the authors' pretrained_prompts.zip (train_simple_prompt.py:55-67, train_cpm.py:51).
_RELEASED_SIMPLE = re.compile(r"^(?P<kind>Single|Class)_(?P<dataset>[a-z0-9]+)_sd(?P<sd>[\d-]+)_(?P<form>TokenEmbeds(?P<n>\d+)|HiddenState)$")
_RELEASED_CPM = re.compile(
    r"^CPM_(?P<dataset>[a-z0-9]+)_sd(?P<sd>[\d-]+)_(?P<mode>Pair|Img)-(?P<enc>DINO|CLIP)-(?P<feat>Feat|Head)-G(?P<g>\d+)-C(?P<c>\d+)$"
)
# The authors' CPM state-dict names -> sdm's (hybrid_captioner.py:49-77; "linear" is the Img and Head modes' g_d).
_RELEASED_CPM_NAMES = {
    "global_embeds": "global_embeds",
    "positional_embedding": "positional_embedding",
    "alpha_cond": "alpha_cond",
    "linear_C.weight": "g_d.weight",
    "linear_C.bias": "g_d.bias",
    "linear.weight": "g_d.weight",
    "linear.bias": "g_d.bias",
    "linear_N.weight": "g_n.weight",
    "linear_N.bias": "g_n.bias",
}


@dataclass
class ReleasedPrompt:
    """One prompt of the authors' release, parsed from its folder name."""

    name: str  # e.g. "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50"
    kind: Literal["single", "class", "cpm"]
    dataset: str  # the training dataset ("spair", "pfpascal")
    sd_version: str  # "2-1"
    file: str  # "caption.pt" or "ckpt.pt"
    hidden_state: bool = False  # Single/Class "HiddenState": encoder hidden states, not token embeddings
    n_tokens: int = 75
    cpm: CPMConfig | None = None


def parse_released_name(name: str) -> ReleasedPrompt:
    """Folder name of the authors' release -> what it holds; a ValueError for names of no known form."""
    m = _RELEASED_SIMPLE.match(name)
    if m:
        hidden = m["form"] == "HiddenState"
        return ReleasedPrompt(
            name, m["kind"].lower(), m["dataset"], m["sd"], "caption.pt", hidden_state=hidden,  # type: ignore[arg-type]
            n_tokens=77 if hidden else int(m["n"]),
        )
    m = _RELEASED_CPM.match(name)
    if m:
        if m["enc"] != "DINO":
            raise ValueError(f"{name}: CPM prompts conditioned on CLIP features are not supported (only DINOv2, as the paper)")
        g, c = int(m["g"]), int(m["c"])
        cfg = CPMConfig(
            n_global=g if g else 25, n_cond=c, global_prompt=g > 0,
            descriptor="patch" if m["feat"] == "Feat" else "global", condition="pair" if m["mode"] == "Pair" else "image",
        )
        return ReleasedPrompt(name, "cpm", m["dataset"], m["sd"], "ckpt.pt", cpm=cfg)
    raise ValueError(
        f"{name!r} is not a folder name of the authors' released prompts; expected e.g. Single_spair_sd2-1_TokenEmbeds75, "
        "Class_pfpascal_sd2-1_TokenEmbeds75, Single_spair_sd2-1_HiddenState or CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50"
    )


def list_released(path: str | Path) -> list[str]:
    """Names of the authors' prompt folders in `path`: pretrained_prompts.zip, the folder it unzips to, or one
    prompt folder."""
    path = Path(path)
    names: set[str] = set()
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
        names = {Path(m).parent.name for m in members if Path(m).name in ("caption.pt", "ckpt.pt")}
    elif path.is_dir():
        files = [*path.glob("caption.pt"), *path.glob("ckpt.pt"), *path.glob("*/caption.pt"), *path.glob("*/ckpt.pt"), *path.glob("*/*/caption.pt"), *path.glob("*/*/ckpt.pt")]
        names = {f.parent.name for f in files}
    else:
        raise FileNotFoundError(f"no released prompts at {path}: pass pretrained_prompts.zip, the folder it unzips to, or one prompt folder")
    return sorted(names)


def _read_released(path: Path, entry: ReleasedPrompt) -> Any:
    """torch.load of the prompt's file (tensors only, mapped to the CPU: the authors saved some on a GPU)."""
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            member = next((m for m in zf.namelist() if Path(m).parent.name == entry.name and Path(m).name == entry.file), None)
            if member is None:
                raise FileNotFoundError(f"{path} has no {entry.name}/{entry.file}")
            data = io.BytesIO(zf.read(member))
        return torch.load(data, map_location="cpu", weights_only=True)
    candidates = [path / entry.file] if path.name == entry.name else [*path.glob(f"{entry.name}/{entry.file}"), *path.glob(f"*/{entry.name}/{entry.file}")]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise FileNotFoundError(f"{entry.file} not found for {entry.name} under {path}")
    return torch.load(found[0], map_location="cpu", weights_only=True)


def _check_special_rows(t: torch.Tensor, n: int, featurizer: SDFeaturizer, where: str) -> None:
    """Rows 0 and n + 1 of a TokenEmbeds tensor are the text encoder's BOS and EOS embedding-layer outputs."""
    bos = featurizer.special_token_embeddings()[0].float().cpu()
    eos = featurizer.eos_embeddings()[n + 1].float().cpu()
    err = max((t[0] - bos).abs().max().item(), (t[n + 1] - eos).abs().max().item())
    if err > 1e-3 * max(1.0, bos.abs().max().item()):
        raise ValueError(
            f"{where}: rows 0 and {n + 1} should be this model's BOS and EOS embeddings but differ by up to {err:.3g}: "
            f"the prompt was made for another text encoder than {featurizer.sd.name!r}"
        )


def import_sd4match(
    path: str | Path,
    featurizer: SDFeaturizer,
    *,
    name: str | None = None,
    encoders: PromptEncoders | None = None,
) -> tuple[PromptModule, ReleasedPrompt]:
    """Loads one of the authors' released prompts (pretrained_prompts.zip of github ActiveVisionLab/SD4Match)
    as an sdm prompt module computing what their code computes.

    Args:
        path: pretrained_prompts.zip, the folder it unzips to, or one prompt folder (holding caption.pt or ckpt.pt).
        name: which prompt folder, e.g. "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50" (needed when `path` holds several).
        encoders: DINOv2 for CPM prompts.

    Returns (module, what the folder name says). Single/Class "TokenEmbeds" tensors (C x 77 x D embedding-layer
    outputs) become the learned vectors 1..N after checking that rows 0 and N + 1 are this model's BOS and EOS;
    "HiddenState" tensors are used as the UNet's encoder hidden states; CPM state dicts map onto `CPMPrompt`.
    Raises ValueError naming what does not fit (unknown names, missing keys, shapes, another text encoder).
    """
    path = Path(path)
    names = list_released(path)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} prompts; choose one with name=...: {', '.join(names) or 'none found'}")
        name = names[0]
    elif name not in names:
        raise ValueError(f"no prompt {name!r} in {path}; it holds: {', '.join(names) or 'none'}")
    entry = parse_released_name(name)
    data = _read_released(path, entry)
    d = featurizer.sd.embed_dim
    where = f"{name}/{entry.file}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a dict of tensors, found {type(data).__name__}")
    if entry.kind == "cpm":
        unknown = sorted(k for k in data if k not in _RELEASED_CPM_NAMES and not k.startswith("text_model_embeddings."))
        if unknown:
            raise ValueError(f"{where}: unknown tensors {unknown}; a CPM checkpoint holds {sorted(set(_RELEASED_CPM_NAMES))}")
        state = {_RELEASED_CPM_NAMES[k]: v.float() for k, v in data.items() if k in _RELEASED_CPM_NAMES}
        module = build_prompt("cpm", featurizer, encoders=encoders, cpm=entry.cpm)
        check_fits(module, state, f"the released prompt {where}", f"SD {entry.sd_version}", int(state.get("alpha_cond", torch.zeros(1)).shape[-1]), featurizer)
        return load_state(module, state), entry
    tensors = {k: v.float() for k, v in data.items()}
    for k, t in tensors.items():
        if t.dim() != 3 or t.shape[0] != 1 or t.shape[1] != 77:
            raise ValueError(f"{where}: tensor {k!r} has shape {list(t.shape)}; expected [1, 77, D]")
        if t.shape[2] != d:
            raise ValueError(
                f"{where}: D = {t.shape[2]} (SD {entry.sd_version}) but {featurizer.sd.name!r} has D = {d}: load the model it was made for"
            )
    if entry.kind == "single":
        if set(tensors) != {"dataset"}:
            raise ValueError(f"{where}: a Single prompt holds one tensor named 'dataset'; found {sorted(tensors)}")
        keys = ["dataset"]
    else:
        keys = sorted(tensors)
    stacked = torch.cat([tensors[k] for k in keys])  # C x 77 x D
    if entry.hidden_state:
        init = stacked
    else:
        for k in keys:
            _check_special_rows(tensors[k][0], entry.n_tokens, featurizer, f"{where}[{k!r}]")
        init = stacked[:, 1 : entry.n_tokens + 1]
    module = SinglePrompt(init) if entry.kind == "single" else ClassPrompt(init, keys)
    return module.to(featurizer.device), entry


__all__ = [
    "ReleasedPrompt",
    "import_sd4match",
    "list_released",
    "parse_released_name",
]
