"""Tensors to the GPU without making the host wait. A blocking copy waits until the GPU has run everything queued
before it, and so may a copy from pageable (not page-locked) memory (the CUDA driver stages it), so the host cannot
prepare the next work meanwhile."""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`host` on `device` (in `dtype` if given). From the CPU to a GPU the copy goes through page-locked memory and
    does not wait; elsewhere it is `Tensor.to`."""
    device = torch.device(device)
    if host.device.type == "cpu" and device.type == "cuda":
        pinned = host if host.is_pinned() else host.pin_memory()
        # the dtype after the copy: converted on the CPU it would be a new, pageable tensor
        return pinned.to(device, non_blocking=True).to(dtype)
    return host.to(device, dtype)


__all__ = ["upload"]
