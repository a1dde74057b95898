"""Checks on a GPU the premise of training's padded VAE batches (`sdm.train.ENCODE_BATCH`): an image's posterior
computed in a padded batch of 8 is the same bits at any position and beside any other images, in float32, float16
and bfloat16, for the tiny model and the full-size SD2-1 VAE (random weights). Prints one line per case.

    python benchmarks/check_padded_batches.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdm.features import SDFeaturizer
from sdm.models import sd21_architecture, tiny_stable_diffusion

BATCH = 8


@torch.no_grad()
def _padded(featurizer: SDFeaturizer, images: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The posteriors of images[idx] computed in one batch of BATCH, padded with copies of the last."""
    rows = idx + [idx[-1]] * (BATCH - len(idx))
    return featurizer.encode_posterior(images[rows])[: len(idx)].float().cpu()


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(torch.__version__, torch.cuda.get_device_name() if device == "cuda" else "cpu", flush=True)
    failures = 0
    for name, build, size in (("tiny", tiny_stable_diffusion, 64), ("sd21-architecture", sd21_architecture, 768)):
        sd = build(0).to(device)
        images = torch.rand(11, 3, size, size, generator=torch.Generator().manual_seed(0))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            sd.vae.to(dtype)
            featurizer = SDFeaturizer(sd, image_size=size)

            batches = torch.cat([_padded(featurizer, images, list(range(8))), _padded(featurizer, images, list(range(8, 11)))])
            one_each = torch.cat([_padded(featurizer, images, [i]) for i in range(11)])
            shuffled = _padded(featurizer, images, [10, 3, 5, 7, 1, 0, 2, 4])
            same = torch.equal(batches, one_each) and torch.equal(shuffled[1], batches[3])
            failures += not same
            print(f"{name} {dtype!s:15s} same bits at any position and beside any images: {same}", flush=True)
        del sd
        if device == "cuda":
            torch.cuda.empty_cache()
    return int(failures > 0)


if __name__ == "__main__":
    raise SystemExit(main())
