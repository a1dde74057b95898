"""Seeded random draws: per-image seeds that do not depend on the batch, and a batch's draws shared across the
processes of data-parallel training."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def derived_seed(seed: int, *parts: str) -> int:
    """A 63-bit generator seed from a run's `seed` and names (blake2b), e.g. one per learned tensor or image."""
    digest = hashlib.blake2b("|".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def image_seed(seed: int, key: str, purpose: str) -> int:
    """The seed of one image's draw: the run's `seed`, the image's `key` (its id) and what the draw is for
    ("latent", "noise"). Draws seeded this way do not depend on the other images of a batch, and two
    different images never share them."""
    return derived_seed(seed, purpose, key)


def keyed_normal(
    keys: Sequence[str], shape: tuple[int, ...], seed: int, purpose: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """len(keys) x *shape standard normal float32 draws on `device`, one generator per key seeded by `image_seed`:
    a key draws the same numbers in any batch and on any device of one type (torch's CPU and CUDA generators
    differ, so a CPU run and a GPU run draw different noise, as the authors' `randn_like` does). Drawing on the
    device keeps the host free: CPU draws for ensemble 8 took longer than the VAE they should overlap."""
    out = torch.empty((len(keys), *shape), device=device)
    for row, key in zip(out, keys):
        torch.randn(shape, generator=torch.Generator(device=out.device).manual_seed(image_seed(seed, key, purpose)), out=row)
    return out


_KEY_PRIMES = (2_147_483_647, 2_147_483_629)  # two 31-bit primes: two independent 31-bit halves of a key


def content_keys(x: torch.Tensor) -> list[str]:
    """One key per batch item from its exact values (used when the caller names no image ids): two modular
    fingerprints of the float32 bit patterns, computed in integer arithmetic on `x`'s device, so they are the same
    on every device and whatever else is in the batch, and only 2 numbers per item cross to the host (a hash of the
    bytes on the CPU cost more than the UNet at ensemble 1)."""
    flat = x.detach().float().flatten(1).contiguous().view(torch.int32).long() & 0xFFFFFFFF  # B x N bit patterns
    i = torch.arange(flat.shape[1], device=flat.device, dtype=torch.long)
    mixed = (i * 0x9E3779B1) ^ (i >> 7) ^ 0x5BD1E995  # distinct per position; exact in int64
    parts = []
    for prime in _KEY_PRIMES:
        weight = mixed % prime + 1  # < 2^31, so value x weight < 2^63 and each term mod prime < 2^31
        parts.append(((flat * weight) % prime).sum(dim=1) % prime)  # N terms < 2^31: the sum cannot overflow
    pair = torch.stack(parts, dim=1).cpu().tolist()
    shape = "x".join(str(d) for d in x.shape[1:])
    return [f"{shape}:{a:08x}{b:08x}" for a, b in pair]


@dataclass(frozen=True)
class BatchRows:
    """Fresh draws from `generator` for a whole batch of `total` items, of which the items at hand are rows
    `start:stop`. Data-parallel training passes it as the generator: every process draws the numbers of the whole
    batch and keeps its rows, so that splitting a batch over processes changes no draw."""

    generator: torch.Generator
    start: int
    stop: int
    total: int


Draws = torch.Generator | BatchRows  # fresh draws (training)


__all__ = ["BatchRows", "Draws", "content_keys", "derived_seed", "image_seed", "keyed_normal"]
