"""Capturing cross-attention: `CrossAttentionCapture` processors installed on chosen layers by
`capture_cross_attention` (a context manager that restores the original processors), storing differentiable
attention probabilities in an `AttentionStore`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from sdm.attention.layers import _block_resolutions, _module_name, execution_key
from sdm.config import (
    HeadRule,
)
from sdm.devices import upload


# ---- capture --------------------------------------------------------------------------------------------------
@dataclass
class AttentionStore:
    """Attention probabilities of the captured layers from the latest UNet forward.

    ``probs[name]`` is B x heads x (h * w) x L (softmax over the L tokens), kept in the autograd graph;
    ``resolutions[name]`` its (h, w). The store is emptied at the start of every UNet forward.
    """

    layers: tuple[str, ...]
    layer_resolutions: dict[tuple[int, int], dict[str, tuple[int, int]]] = field(default_factory=dict, repr=False)
    latent_hw: tuple[int, int] | None = None
    probs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    resolutions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def clear(self) -> None:
        self.probs.clear()
        self.resolutions.clear()

    def add(self, name: str, probs: torch.Tensor, resolution: tuple[int, int]) -> None:
        self.probs[name] = probs
        self.resolutions[name] = resolution

    def maps(
        self,
        token: int | Sequence[int] = 1,
        size: tuple[int, int] | None = None,
        heads: Sequence[int] | HeadRule | None = None,
    ) -> torch.Tensor:
        """Attention maps of the chosen tokens, averaged over heads and captured layers.

        heads: indices, "upper-half" (heads h/2..h-1 of each layer, what Hedlin et al.'s code averages), or
        None / "all". Each layer's map is upsampled (bilinear, align corners) to `size` = (H, W) (default: the
        largest captured resolution) before averaging. Returns B x T x H x W float32 (T tokens; T = 1 for an
        int), values in [0, 1].
        """
        return self.layer_maps(token, size, heads).mean(dim=1)

    def layer_maps(
        self,
        token: int | Sequence[int] = 1,
        size: tuple[int, int] | None = None,
        heads: Sequence[int] | HeadRule | None = None,
        align_corners: bool = True,
    ) -> torch.Tensor:
        """As `maps`, without the mean over layers: B x layers x T x H x W (layers in execution order).
        `align_corners=False` upsamples as Hedlin et al.'s code does (optimize_token.py:352-359)."""
        if size is None:
            size = max(self.resolutions.values(), key=lambda hw: hw[0] * hw[1])
        per_layer = []
        for m in self.native_maps(token, heads):
            if tuple(m.shape[-2:]) != tuple(size):
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=align_corners)
            per_layer.append(m)
        return torch.stack(per_layer, dim=1)

    def native_maps(
        self, token: int | Sequence[int] = 1, heads: Sequence[int] | HeadRule | None = None
    ) -> list[torch.Tensor]:
        """Each captured layer's maps at its own resolution, averaged over the chosen heads: a list (layers in
        execution order) of B x T x h x w float32."""
        missing = [name for name in self.layers if name not in self.probs]
        if missing:
            raise RuntimeError(f"no attention captured for {missing}; did the UNet forward reach these layers?")
        tokens = [token] if isinstance(token, int) else list(token)
        out = []
        for name in self.layers:
            probs = self.probs[name]
            if heads == "upper-half":
                probs = probs[:, probs.shape[1] // 2 :]
            elif heads is not None and heads != "all":
                if max(heads) >= probs.shape[1]:
                    raise ValueError(f"head index {max(heads)} out of range for {name} ({probs.shape[1]} heads)")
                probs = _pick(probs, 1, heads)
            h, w = self.resolutions[name]
            m = _pick(probs, -1, tokens).float().mean(dim=1)  # B x hw x T
            out.append(m.transpose(1, 2).reshape(m.shape[0], len(tokens), h, w))
        return out


def _pick(t: torch.Tensor, dim: int, indices: Sequence[int]) -> torch.Tensor:
    """`t`'s entries `indices` along `dim`, as indexing with the list gives them (a contiguous copy), without the
    blocking copy of a list index to the GPU, which waits for everything queued before it (four times a UNet pass
    for Hedlin et al.'s layers): a run of consecutive indices as a slice, others through `sdm.devices.upload`."""
    size = t.shape[dim]
    if any(not -size <= i < size for i in indices):
        raise IndexError(f"index out of range for dimension {dim} of size {size}: {list(indices)}")
    wrapped = [i % size for i in indices]
    first = wrapped[0] if wrapped else 0
    if wrapped == list(range(first, first + len(wrapped))):
        return t.narrow(dim, first, len(wrapped)).contiguous()
    return t.index_select(dim, upload(torch.tensor(wrapped), t.device))


class CrossAttentionCapture:
    """Attention processor for a cross-attention layer that stores its probabilities in an `AttentionStore`.

    Computes softmax(Q K^T * scale) explicitly (float32 softmax; upcast settings of the layer honoured) and
    the output from it as diffusers' `AttnProcessor` does, so the UNet computes the same function. Calls
    without encoder hidden states (self-attention) go to the layer's original processor.
    """

    def __init__(self, name: str, store: AttentionStore, original: Any) -> None:
        self.name = name
        self.store = store
        self.original = original

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, None, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # B x heads x N x d
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # B x heads x L x d
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1])
        # float32 softmax: the maps are what we optimise, half-precision rounding would blur small gradients.
        probs = scores.float().softmax(dim=-1)  # B x heads x N x L
        self.store.add(self.name, probs, self._resolution(n_query))

        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _resolution(self, n_query: int) -> tuple[int, int]:
        store = self.store
        hw = None
        if store.latent_hw is not None:
            hw = store.layer_resolutions.get(store.latent_hw, {}).get(self.name)
        if hw is None or hw[0] * hw[1] != n_query:
            side = math.isqrt(n_query)
            if side * side != n_query:
                raise RuntimeError(f"cannot infer the spatial size of {self.name} from {n_query} query positions")
            hw = (side, side)
        return hw


@contextlib.contextmanager
def capture_cross_attention(unet: UNet2DConditionModel, layers: Sequence[str]) -> Iterator[AttentionStore]:
    """Within the context, the cross-attention probabilities of `layers` (processor names as in
    `unet.attn_processors`, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``) are
    captured into the yielded `AttentionStore` at every UNet forward.

    Only those layers get a new processor; the original processor objects are put back on exit, also when
    the body raises.
    """
    layers = tuple(sorted(dict.fromkeys(layers), key=execution_key))
    if not layers:
        raise ValueError("no layers to capture")
    processors = unet.attn_processors
    modules = dict(unet.named_modules())
    unknown = [name for name in layers if name not in processors]
    if unknown:
        raise ValueError(f"unknown attention layers {unknown}; see cross_attention_layers() for valid names")
    not_cross = [name for name in layers if not getattr(modules[_module_name(name)], "is_cross_attention", False)]
    if not_cross:
        raise ValueError(f"not cross-attention layers (attn2): {not_cross}")

    store = AttentionStore(layers)

    def before_forward(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        store.clear()
        if sample is not None:
            latent = (int(sample.shape[-2]), int(sample.shape[-1]))
            store.latent_hw = latent
            if latent not in store.layer_resolutions:
                blocks = _block_resolutions(unet, latent)
                store.layer_resolutions[latent] = {
                    name: blocks["mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])]
                    for name in layers
                }

    originals = {name: processors[name] for name in layers}
    handle = unet.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        for name in layers:
            modules[_module_name(name)].set_processor(CrossAttentionCapture(name, store, originals[name]))
        yield store
    finally:
        handle.remove()
        for name, processor in originals.items():
            modules[_module_name(name)].set_processor(processor)


__all__ = [
    "AttentionStore",
    "CrossAttentionCapture",
    "capture_cross_attention",
]
