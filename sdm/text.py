"""The text side of a diffusion model: strings and learned token vectors -> the UNet's encoder hidden states.

`ClipText` is SD 1.x / 2.x's: one CLIP text encoder and its tokenizer, 77 positions. Learned prompts are
assembled from embedding-layer outputs as docs/specification.md ("Prompt assembly for learned prompts") says.
A model with another text encoder (or two, as SDXL) brings its own class with the same methods
(`TextConditioning`); `StableDiffusion.text` returns it, and the featurizer, the prompts and training only call
these methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from sdm.devices import upload


class TextConditioning(Protocol):
    """What the featurizer, the prompt modules and training need from a model's text side."""

    length: int  # positions of the hidden states the UNet attends to (77)
    width: int  # D, the width of a token vector and of a hidden state
    vocab_size: int

    def modules(self) -> list[nn.Module]:
        """The frozen modules (moved, cast and fingerprinted with the model)."""
        ...

    def encode_text(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """B strings -> B x length x D hidden states."""
        ...

    def encode_learned(self, learned: torch.Tensor) -> torch.Tensor:
        """B x N x D learned vectors -> B x length x D hidden states, differentiable in `learned`."""
        ...

    def token_embeddings(self, token_ids: torch.Tensor, first_position: int = 1) -> torch.Tensor:
        """B x N token ids placed at positions first_position.. -> B x N x D embedding-layer outputs."""
        ...


class ClipText:
    """One CLIP text encoder and its tokenizer (SD 1.x, SD 2.x): hidden states are the encoder's last hidden state
    after its final layer norm."""

    def __init__(self, encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        # The module holding embeddings, encoder layers and final norm: CLIPTextModel itself since transformers
        # 5.x flattened it, its `text_model` before (5.0 still has it).
        self._parts = getattr(encoder, "text_model", encoder)
        self._special_cache: dict[str, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def modules(self) -> list[nn.Module]:
        return [self.encoder]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        tok = self.tokenizer
        ids = tok(list(texts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt")
        return self.encoder(upload(ids.input_ids, device or self.device)).last_hidden_state

    def special(self, kind: str) -> torch.Tensor:
        """length x D embedding-layer outputs: "pad" is [BOS, pad x 76] (BOS at position 0, the pad token at
        every other position), "eos" the EOS token at every position. Kept per device and dtype."""
        key = f"{kind}:{self.device}:{self.encoder.dtype}"
        if key not in self._special_cache:
            tok = self.tokenizer
            fill = tok.eos_token_id if kind == "eos" else tok.pad_token_id
            ids = torch.full((1, self.length), fill, dtype=torch.long, device=self.device)
            if kind == "pad":
                ids[0, 0] = tok.bos_token_id
            with torch.no_grad():
                self._special_cache[key] = self._parts.embeddings(input_ids=ids)[0]
        return self._special_cache[key]

    def assemble(self, learned: torch.Tensor) -> torch.Tensor:
        """B x N x D learned vectors -> B x 77 x D sequence [BOS, learned, EOS at N+1, pad...] of embedding-layer
        outputs (the learned vectors already include their position)."""
        b, n, _ = learned.shape
        pad = self.special("pad").to(learned.dtype)
        eos = self.special("eos")[n + 1].to(learned.dtype)
        parts = [pad[:1].expand(b, 1, -1), learned, eos.view(1, 1, -1).expand(b, 1, -1), pad[n + 2 :].expand(b, -1, -1)]
        return torch.cat(parts, dim=1)

    def encode_learned(self, learned: torch.Tensor) -> torch.Tensor:
        """The assembled sequence bypasses the embedding layer and runs through the frozen encoder layers with
        CLIP's causal mask, then the final layer norm."""
        te = self._parts
        seq = self.assemble(learned.to(self.encoder.dtype))
        n = seq.shape[1]
        mask = torch.full((n, n), torch.finfo(seq.dtype).min, device=seq.device, dtype=seq.dtype).triu(1)
        mask = mask.view(1, 1, n, n).expand(seq.shape[0], 1, n, n)
        hidden = te.encoder(inputs_embeds=seq, attention_mask=mask).last_hidden_state
        return te.final_layer_norm(hidden)

    def token_embeddings(self, token_ids: torch.Tensor, first_position: int = 1) -> torch.Tensor:
        n = token_ids.shape[-1]
        pos = torch.arange(first_position, first_position + n, device=token_ids.device).unsqueeze(0).expand(token_ids.shape[0], -1)
        with torch.no_grad():
            return self._parts.embeddings(input_ids=token_ids, position_ids=pos)


__all__ = ["ClipText", "TextConditioning"]
