"""Opt-in speed settings (`sdm.speed.optimize`) compute the same features as the plain model.

GPU-only settings (bf16, torch.compile) are checked inside benchmarks/bench.py, which prints their errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdm
from sdm.features import SDFeaturizer
from sdm.speed import optimize

SIZE = 64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_channels_last_and_fused_qkv_keep_features() -> None:
    plain = sdm.tiny_stable_diffusion(0)
    fast = optimize(copy.deepcopy(plain), channels_last=True, fuse_qkv=True)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    prompt = torch.randn(1, 5, plain.embed_dim, generator=torch.Generator().manual_seed(2))
    kwargs = dict(image_size=SIZE, timestep=50, ensemble=3)
    with torch.no_grad():
        want = SDFeaturizer(plain, **kwargs)(images, prompt)
        got = SDFeaturizer(fast, **kwargs)(images, prompt)
    assert got.shape == want.shape
    assert rel(got, want) < 1e-5
    assert fast.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv is not None
    assert next(fast.unet.conv_in.parameters()).is_contiguous(memory_format=torch.channels_last)


def test_optimize_keeps_model_frozen_and_prompt_gradients() -> None:
    plain = sdm.tiny_stable_diffusion(0)
    fast = optimize(copy.deepcopy(plain))
    assert not any(p.requires_grad for m in (fast.unet, fast.vae, fast.text_encoder) for p in m.parameters())
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    grads = []
    for sd in (plain, fast):
        featurizer = SDFeaturizer(sd, image_size=SIZE, timestep=261)
        tokens = torch.randn(1, 75, sd.embed_dim, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        featurizer(images, tokens, generator=torch.Generator().manual_seed(5)).square().mean().backward()
        grads.append(tokens.grad)
    assert rel(grads[1], grads[0]) < 1e-5


def test_optimize_is_idempotent_and_casts() -> None:
    sd = optimize(optimize(sdm.tiny_stable_diffusion(0)), dtype=torch.bfloat16)
    assert sd.unet.dtype == torch.bfloat16 and sd.vae.dtype == torch.bfloat16 and sd.text_encoder.dtype == torch.bfloat16
    feats = SDFeaturizer(sd, image_size=SIZE)(torch.rand(1, 3, SIZE, SIZE), [""])
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats).all()


def test_compile_scope_resnets_leaves_attention_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize(compile_scope="resnets") compiles the VAE encoder and the UNet's resnets and resamplers only, so the
    attention processors that sdm.attention installs never run inside compiled code."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(self))
    sd = sdm.tiny_stable_diffusion()
    optimize(sd, channels_last=False, fuse_qkv=False, compile=True, compile_scope="resnets")
    unet_parts = [m for m in compiled if m is not sd.vae.encoder]
    assert compiled[0] is sd.vae.encoder
    assert unet_parts and all(isinstance(m, (ResnetBlock2D, Downsample2D, Upsample2D)) for m in unet_parts)
    assert len(unet_parts) == sum(isinstance(m, (ResnetBlock2D, Downsample2D, Upsample2D)) for m in sd.unet.modules())
    assert not any(isinstance(sub, Attention) for m in unet_parts for sub in m.modules())


def test_upload_copies_to_the_device_without_making_the_host_wait() -> None:
    """`sdm.devices.upload` gives what `Tensor.to` gives; on a GPU through page-locked memory, with no synchronising
    operation (checked under `torch.cuda.set_sync_debug_mode("error")`, on a machine with CUDA)."""
    from sdm.devices import upload

    host = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(upload(host, "cpu", torch.float32), host.float())
    assert upload(host, torch.device("cpu")) is host
    if not torch.cuda.is_available():
        return
    want = host.to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = upload(host, "cuda", torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


class _HostWaits(TorchDispatchMode):
    """Records the operations that make the host wait for a GPU, with PyTorch's "meta" device standing in for it
    (shapes without data, on any machine): reading a value back (`.item()`, `nonzero`; a copy to the CPU raises), a
    blocking copy to the device, and a tensor made from Python numbers (on a GPU, `new_tensor` or `device=` copies
    it with a blocking copy, which PyTorch does not show to this mode)."""

    READS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        out = func(*args, **kwargs)
        before = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        after = {o.device.type for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)}
        copy_between = name in ("_to_copy", "copy_") and before != after and not kwargs.get("non_blocking", False)
        if name in self.READS or name.startswith("lift_fresh") or copy_between:
            self.ops.append(f"{name}: {sorted(before)} -> {sorted(after)}")
        return out


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("matcher", ["nearest", "soft_argmax", "kernel_soft_argmax"])
def test_feature_predictor_queues_a_batch_without_waiting_for_the_device(matcher: str, device: str) -> None:
    """`evaluate` reads a batch's predictions back only after queueing the next batch, so the host prepares it while
    the GPU computes. Any wait inside the predictor (here: the keypoints' copy, matching, the scaling back to
    pixels) would undo that: the GPU would idle while the host prepares every batch. A blocking copy of two scales in
    `to_image_coords` did so once. The features live on "meta" (copies and reads are seen) or on the CPU (PyTorch
    shows `new_tensor` to the audit only there)."""
    from sdm.data import SyntheticPairs, collate_pairs
    from sdm.predictors import feature_predictor

    class DeviceFeatures:  # an extractor whose features live on the stand-in device
        conditioning = "pair"

        def pair_features(self, src: object, trg: object) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.rand(2, 8, 6, 6, device=device), torch.rand(2, 8, 6, 6, device=device)

    ds = SyntheticPairs(n=2, image_size=64, seed=0)
    predict = feature_predictor(DeviceFeatures(), ds, matcher=matcher)  # type: ignore[arg-type]
    batch = collate_pairs([ds[0], ds[1]])
    with _HostWaits() as waits:
        out = predict(batch)
    assert out.device.type == device and out.shape == batch.trg_kps.shape
    assert waits.ops == []
    with _HostWaits() as waits:  # the audit sees each kind of wait
        torch.rand(3).new_tensor([1.0, 2.0])
        torch.ones(2).to("meta")
        torch.ones(2).nonzero()
    assert [op.split(":")[0] for op in waits.ops] == ["lift_fresh", "_to_copy", "nonzero"]


def test_authors_inference_queues_its_crops_without_reading_the_device() -> None:
    """Hedlin et al.'s inference recentres each crop on the argmax of the maps so far (optimize_token.py:266-280).
    Reading that argmax on the host made it wait for the GPU 16 times a target (round 8's profile); the offsets are
    now computed where the maps are. The maps here live on "meta" (a read or a blocking copy of them is seen); the
    UNet is replaced by maps of the right shape, and the CPU generator's own work is not a wait."""
    from types import SimpleNamespace

    from sdm.attention.crops import AuthorsCrops

    size, side, n, layers = 32, (16, 16), 3, 2

    def unet_maps(noisy, hidden, timestep, store, per_layer=False, size=None) -> torch.Tensor:
        return torch.rand(noisy.shape[0], layers, *size, device="meta")

    grid = torch.zeros(size - side[0] + 1, size - side[1] + 1, 4, 4, 4, device="meta")  # the crop store's latents
    m = SimpleNamespace(
        config=SimpleNamespace(image_size=(size, size), crop_margin=0.15, progress=False), map_size=(size, size),
        layers=[0] * layers, device=torch.device("meta"), _upload=lambda t: t.to("meta", non_blocking=True),
        _crop_bank=lambda pixels, side: lambda offsets: grid[offsets[:, 1], offsets[:, 0]],
        _noisy=lambda latents, timestep, gen: latents, _chunks=lambda k: [slice(0, 2), slice(2, k)], _unet_maps=unet_maps,
    )
    gen = torch.Generator().manual_seed(0)
    with _HostWaits() as waits:
        out = AuthorsCrops().target_maps(m, None, torch.zeros(n, 5, 8, device="meta"), 261, 20, 0.5, gen, None)
    assert out.shape == (n, layers, size, size) and out.device.type == "meta"
    assert [op for op in waits.ops if "meta" in op] == []
