"""GPU throughput harness: our path (sdm, fast settings) against the reference path (benchmarks/reference.py).

    python benchmarks/bench.py --out bench.json            # everything, SD2-1 architecture, 768 px
    python benchmarks/bench.py --tiny --out smoke.json     # tiny model, small sizes: a smoke test (CPU works)

Weights are random (`sdm.sd21_architecture`): the same cost as the real model. benchmarks/README.md
explains every row. Prints the correctness checks as they run and a table last; writes everything to --out.
"""

# ruff: noqa: B023  (lambdas in loops are called at once)
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import itertools
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import ReferenceFeaturizer, reference_train_step

import sdm
from sdm.data.base import Pair, PairDataset
from sdm.encoders import PromptEncoders
from sdm.evaluate import evaluate
from sdm.extractors import SDExtractor
from sdm.features import SDFeaturizer
from sdm.matching import match, to_feature_coords, to_image_coords
from sdm.predictors import batch_images
from sdm.prompts import build_prompt
from sdm.speed import optimize

SPAIR_TEST_PAIRS = 12_234
# Assumption: SPair-71k has 1,800 images (18 categories x 100); the test split cannot use more, so projecting
# with all 1,800 is an upper bound for the per-image (Single) cost.
SPAIR_TEST_IMAGES = 1_800
RESULTS: dict = {}
SAVE: list[Callable[[], None]] = []  # writes RESULTS to --out (set by main): long sections save after each row
WEIGHTS = "random (sdm.sd21_architecture, sdm.models.sd14_architecture): the real models' cost, not their outputs"


def log(*args) -> None:
    print(*args, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_dino(tiny: bool, device) -> torch.nn.Module:
    """DINOv2-B/14 of `Dinov2Config()`'s defaults (a toy width with `tiny`), random weights seeded 0, float32, eval."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2) if tiny else Dinov2Config()
    torch.manual_seed(0)
    return Dinov2Model(cfg).to(device).eval()


@contextlib.contextmanager
def step_window(warm: int, steps: int, on_start: Callable[[], object] | None = None, on_stop: Callable[[], object] | None = None):
    """Times training steps `warm + 1 .. warm + steps` of `sdm.train.train` (run it for `warm + steps + 1` steps
    inside) through its step calls, synchronised only at the two ends of the window so that the loop keeps its own
    lack of host syncs; `on_start` / `on_stop` run there (a profiler). Yields a dict that holds the mean "step_s"
    after the block. (The step, not the loss: a CUDA-graph replay calls no loss function.)"""
    from sdm import train as train_module

    step_fn, stamps, out = train_module._Run.step, [], {}

    def hooked(run, *a, **k):
        if len(stamps) in (warm, warm + steps):
            sync()
            hook = on_start if len(stamps) == warm else on_stop
            hook() if hook is not None else None
        stamps.append(time.perf_counter())
        return step_fn(run, *a, **k)

    train_module._Run.step = hooked
    try:
        yield out
    finally:
        train_module._Run.step = step_fn
    out["step_s"] = (stamps[warm + steps] - stamps[warm]) / steps


@contextlib.contextmanager
def encode_peak(device):
    """Splits a training run's GPU memory peak at its one-time latent encode (`sdm.train._preencode_latents`):
    yields a list that holds, after the block, the peak before the encode and the encode's own peak (bytes); the
    CUDA peak counter then holds the steps' peak alone."""
    from sdm import train as train_module

    encode, marks = train_module._preencode_latents, []

    def probed(*a, **k):
        marks.append(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        out = encode(*a, **k)
        marks.append(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return out

    if device.type == "cuda":
        train_module._preencode_latents = probed
    try:
        yield marks
    finally:
        train_module._preencode_latents = encode


def add_train_args(ap, warm: int, steps: int) -> None:
    """The options of a timed training run (`timed_training`): batch, window and the `optimize` variant."""
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--warm", type=int, default=warm)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--compile", action="store_true", help="optimize(compile=True): the UNet's blocks compiled")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode with --compile, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--cuda-graph", action="store_true", help="TrainConfig.cuda_graph: the whole step as one CUDA graph")


def timed_training(args, device, on_start: Callable[[], object] | None = None, on_stop: Callable[[], object] | None = None) -> float:
    """Mean step time (s) of the window of `sdm.train.train` that `add_train_args`' options describe: Single prompt,
    SD2-1 architecture with random weights, bf16 `optimize` (with the chosen variant), 768 px, on `device`."""
    from sdm import train as train_module

    sd = optimize(sdm.sd21_architecture(0, device=device, dtype=torch.bfloat16), channels_last=args.channels_last, compile=args.compile,
                  compile_mode=args.compile_mode)
    cfg = train_module.TrainConfig(prompt="single", steps=args.warm + args.steps + 1, batch_size=args.pairs, mixed_precision="bf16",
                                   val_every=0, checkpoint_every=10**9, log_every=10**9, num_workers=2,
                                   cuda_graph=getattr(args, "cuda_graph", False))
    with tempfile.TemporaryDirectory() as tmp, step_window(args.warm, args.steps, on_start, on_stop) as window:
        train_module.train(cfg, sd, BenchPairs(12, 48, 768, seed=3), out_dir=tmp, progress=False)
    return window["step_s"]


def gpu_kernels(events) -> list:
    """The GPU's own work among profiler events: CUDA events other than the GPU-side ranges of `record_function`
    annotations (`sdm.evaluate.predict` spans a batch's kernels; counting it too would count them twice)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def profile_table(prof, steps: int, header: str, unit: str = "step", wall_s: float | None = None) -> str:
    """A finished torch.profiler run over `steps` training steps (or other units of work) as text: `header`, the
    GPU's busy time per unit (the sum of its kernels' times; with `wall_s`, the wall time of one unit measured
    without the profiler, also its share of that) and the 30 kernels and operators that took the most GPU time."""
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in gpu_kernels(events)) / 1e3 / steps
    busy = f" of {wall_s * 1e3:.1f} ms wall without the profiler (GPU busy {gpu_ms / (wall_s * 1e3):.0%})" if wall_s else ""
    table = events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    return f"{header}, GPU kernels {gpu_ms:.1f} ms per {unit}{busy}\n{table}"


def sync_sites(run, depth: int = 10) -> str:
    """Where `run` makes the host wait for the GPU: the Python stacks (innermost `depth` frames) of the operations
    that synchronise (`torch.cuda.set_sync_debug_mode`), the most frequent first."""
    if not torch.cuda.is_available():
        return "no GPU: no synchronisations to find"
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        sites["".join(traceback.format_list(frames[-depth:]))] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters afterwards
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync()
    total = sum(sites.values())
    return f"{total} synchronisations at {len(sites)} sites\n" + "\n".join(f"--- {n} x\n{stack}" for stack, n in sites.most_common())


def gpu_gaps(prof, top: int = 15) -> str:
    """Where the GPU idles in a finished torch.profiler run: the gaps between its kernels (overlapping kernels merged),
    the largest first, each with the host's outermost operations and annotations (`record_function`, e.g.
    `sdm.evaluate.*`) that ran during it and for how long."""
    events = prof.events()
    cpu = torch.autograd.DeviceType.CPU
    kernels = sorted((e.time_range.start, e.time_range.end) for e in gpu_kernels(events))
    if not kernels:
        return "no GPU kernels in the profile"
    merged = [list(kernels[0])]
    for start, end in kernels[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in itertools.pairwise(merged)), reverse=True)
    outer = [e for e in events if e.device_type == cpu and e.cpu_parent is None]
    first = min((e.time_range.start for e in outer), default=merged[0][0])
    total = sum(g for g, _, _ in gaps)
    long = [g for g, _, _ in gaps if g >= 1000]
    lines = [f"GPU idle before its first kernel {(merged[0][0] - first) / 1e3:.1f} ms; between its first and last kernel "
             f"{total / 1e3:.1f} ms in {len(gaps)} gaps, {sum(long) / 1e3:.1f} ms of it in the {len(long)} gaps of 1 ms or more"]
    for gap, start, end in gaps[:top]:
        during: collections.Counter = collections.Counter()
        for e in outer:
            overlap = min(end, e.time_range.end) - max(start, e.time_range.start)
            if overlap > 0:
                during[e.name] += overlap
        what = "; ".join(f"{name} {t / 1e3:.1f} ms" for name, t in during.most_common(4)) or "nothing profiled"
        lines.append(f"{gap / 1e3:8.1f} ms idle at +{(start - first) / 1e3:.0f} ms, the host in: {what}")
    return "\n".join(lines)


def timeit(fn: Callable[[], object], warmup: int, repeat: int) -> dict:
    """Median wall time of fn (synchronised) after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times}


def count_flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def smooth_images(n: int, size: int, seed: int, device) -> torch.Tensor:
    """Random images with image-like spatial statistics (low-frequency noise), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(size // 32, 2), max(size // 32, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return img.clamp(0, 1).to(device)


class BenchPairs(PairDataset):
    """In-memory pairs among `n_images` images of `n_categories` categories, SPair-like: every image takes
    part in several pairs, pairs listed category by category. Keypoints random, K = 10, threshold 100 px."""

    def __init__(self, n_images: int, n_pairs: int, size: int, n_categories: int = 2, seed: int = 0) -> None:
        self.image_size = (size, size)
        self.categories = [f"cat{c}" for c in range(n_categories)]
        self._images = smooth_images(n_images, size, seed, "cpu")
        per_cat = [[i for i in range(n_images) if i % n_categories == c] for c in range(n_categories)]
        pairs = []
        for c, imgs in enumerate(per_cat):
            cand = [(a, b) for a in imgs for b in imgs if a != b]
            pairs += [(c, a, b) for a, b in cand]
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(pairs), generator=g)[:n_pairs].sort().values.tolist()  # keep category order
        self.pairs = [pairs[i] for i in order]
        if len(self.pairs) < n_pairs:
            raise ValueError(f"only {len(self.pairs)} pairs possible")
        self.kps = torch.rand(n_pairs, 2, 10, 2, generator=g) * (size - 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def load_image(self, image_id: str) -> torch.Tensor:
        return self._images[int(image_id[3:])].clone()  # a fresh tensor, as decoding gives

    def image_ids(self) -> list[str]:
        return list(dict.fromkeys(f"img{i}" for _, a, b in self.pairs for i in (a, b)))

    def keypoints(self, i: int):
        return self.kps[i, 0], self.kps[i, 1], 100.0

    def __getitem__(self, i: int) -> Pair:
        c, a, b = self.pairs[i]
        s = self.image_size[::-1]
        return Pair(
            self.pair_image(f"img{a}"), self.pair_image(f"img{b}"), self.kps[i, 0], self.kps[i, 1], 10,
            self.categories[c], 100.0, f"img{a}", f"img{b}", s, s, f"pair{i}",
        )


# ---- sections -----------------------------------------------------------------------------------------------
def section_env(args, device) -> None:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("diffusers", "transformers", "accelerate", "triton"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        t = timeit(lambda: a @ b, warmup=3, repeat=10)["median_s"]
        info["matmul_bf16_tflops"] = 2 * n**3 / t / 1e12
        del a, b
    else:
        info.update(gpu=None, matmul_bf16_tflops=float("nan"))
    RESULTS["env"] = info
    RESULTS["weights"] = WEIGHTS
    log("env:", json.dumps(info))


def merge_earlier(out: Path) -> list[dict]:
    """Loads an earlier call's results from `out` into RESULTS (its sections stay unless this call reruns them) and
    returns its calls (sections and environment of each)."""
    if not out.exists():
        raise SystemExit(f"--merge: {out} does not exist; run the first sections without --merge")
    earlier = json.loads(out.read_text())
    calls = earlier.pop("calls", None) or [{"sections": earlier["args"]["sections"], "env": earlier.get("env")}]
    earlier.pop("args", None)
    RESULTS.update(earlier)
    return calls


def check_same_machine(calls: list[dict], env: dict) -> None:
    """A merged table must come from one machine kind: refuse another GPU model, warn about another host."""
    for call in calls:
        if call["env"].get("gpu") != env.get("gpu"):
            raise SystemExit(f"--merge: the earlier call ran on {call['env'].get('gpu')}, this one on {env.get('gpu')}")
        if call["env"].get("host") != env.get("host"):
            log(f"warning: the earlier call ran on host {call['env'].get('host')}, this one on {env.get('host')}")


def build_models(args, device):
    build = sdm.tiny_stable_diffusion if args.tiny else sdm.sd21_architecture
    start = time.perf_counter()
    base = build(0, device=device, dtype=torch.float32)  # the plain fp32 path and the reference's weights
    ours_eager = optimize(copy.deepcopy(base), dtype=torch.bfloat16, channels_last=True, fuse_qkv=True)
    ours = copy.deepcopy(ours_eager)
    if args.compile:
        optimize(ours, compile=True, compile_mode=args.compile_mode, channels_last=False, fuse_qkv=False)
    RESULTS["build_s"] = time.perf_counter() - start
    return base, ours, ours_eager


def section_checks(args, base, ours, ours_eager, tokens, device) -> None:
    """Relative error of every fast variant against the plain fp32 path (same noise), and of the reference."""
    size, e = args.size, 2
    images = smooth_images(2, size, 123, device)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            plain_f = SDFeaturizer(base, image_size=size, timestep=50, ensemble=e)
            want = plain_f(images, tokens)
            out = {}
            for name, sd in (("ours_eager_bf16", ours_eager), ("ours_compiled_bf16", ours)):
                got = SDFeaturizer(sd, image_size=size, timestep=50, ensemble=e)(images, tokens)
                out[name] = rel_err(got, want)
            ref = ReferenceFeaturizer(base, timestep=50, ensemble=e)
            lat = plain_f.encode_images(images)
            g = torch.Generator(device=device).manual_seed(plain_f.seed)
            noise = torch.randn((1, e, *lat.shape[1:]), generator=g, device=device).expand(2, -1, -1, -1, -1)
            noise = noise.transpose(0, 1).reshape(2 * e, *lat.shape[1:])  # ensemble-major as the reference
            out["reference_fp16_autocast"] = rel_err(ref(images, ref.encode_prompt(tokens, 2), noise=noise), want)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    RESULTS["checks_rel_err_vs_plain_fp32"] = out
    log("checks (relative L2 error of the features vs the plain fp32 path, same noise):", json.dumps(out))


def section_features(args, base, ours, tokens, device) -> None:
    res = {}
    for e, b in ((1, args.batch_ens1), (8, args.batch_ens8)):
        images = smooth_images(b, args.size, 7, device)
        f_ours = SDFeaturizer(ours, image_size=args.size, timestep=50, ensemble=e)
        f_ref = ReferenceFeaturizer(base, timestep=50, ensemble=e)
        with torch.no_grad():
            start = time.perf_counter()
            f_ours(images, tokens)
            sync()
            first = time.perf_counter() - start
            t_ours = timeit(lambda f=f_ours, x=images: f(x, tokens), args.warmup, args.repeat)
            t_ref = timeit(lambda f=f_ref, x=images: f(x, f.encode_prompt(tokens, x.shape[0])), args.warmup, args.repeat)
            one = images[:1]
            fl_ours = count_flops(lambda: SDFeaturizer(base, image_size=args.size, timestep=50, ensemble=e)(one, tokens))
            fl_ref = count_flops(lambda: f_ref(one, f_ref.encode_prompt(tokens, 1)))
        res[f"ens{e}"] = {
            "batch_images": b,
            "first_call_s": first,
            "ours": {**t_ours, "images_per_s": b / t_ours["median_s"], "flops_per_image": fl_ours},
            "reference": {**t_ref, "images_per_s": b / t_ref["median_s"], "flops_per_image": fl_ref},
        }
        log(f"features ens {e}: ours {b / t_ours['median_s']:.2f} img/s, reference {b / t_ref['median_s']:.2f} img/s")
        torch.cuda.empty_cache() if device.type == "cuda" else None
    RESULTS["features"] = res


def ours_extractor(kind: str, model, size: int, dino16: torch.nn.Module, device) -> SDExtractor:
    """Our evaluation extractor at ensemble 8, t = 50: a Single prompt, or CPM with the bf16 DINOv2 (conditioned
    from the start, the authors' initialisation)."""
    feat = SDFeaturizer(model, image_size=size, timestep=50, ensemble=8)
    enc = PromptEncoders(dino=dino16) if kind == "cpm" else None
    return SDExtractor(feat, build_prompt(kind, feat, encoders=enc).to(device))


def reference_eval(ref: ReferenceFeaturizer, ds: BenchPairs, prompt, n_pairs: int, device, dino_prompt=None) -> Callable[[], None]:
    """The reference evaluation: pair by pair, both images through the reference path, Kernel-Softmax."""

    def run() -> None:
        for i in range(n_pairs):
            p = ds[i]
            src, trg = p.src_image[None].to(device), p.trg_image[None].to(device)
            with torch.no_grad():
                pr = dino_prompt(src, trg) if dino_prompt else prompt
                hidden = ref.encode_prompt(pr, 2)
                feats = ref(torch.cat([src, trg]), hidden)
                size = ds.image_size
                q = to_feature_coords(p.src_kps[None].to(device), size, tuple(feats.shape[-2:]))
                cells = match(feats[:1], feats[1:], q, "kernel_soft_argmax")
                to_image_coords(cells, tuple(feats.shape[-2:]), size).cpu()

    return run


def eval_workers(args, extractor) -> int:
    """DataLoader workers for evaluating `extractor`, as `sdm evaluate` chooses them: none where the batches carry no
    images (Single's feature store, CPM's images read on demand), whose start and stop would be all they measure."""
    return args.eval_workers if batch_images(extractor) else 0


def section_eval(args, base, ours, ours_eager, device) -> None:
    res = {}
    size, e = args.size, 8
    dino32 = bench_dino(args.tiny, device)
    dino16 = copy.deepcopy(dino32).to(torch.bfloat16)
    for kind in ("single", "cpm"):
        n_img, n_pairs = (args.eval_images, args.eval_pairs) if kind == "single" else (args.cpm_images, args.cpm_pairs)
        ds = BenchPairs(n_img, n_pairs, size, n_categories=2 if kind == "single" else 1)
        extractor = ours_extractor(kind, ours, size, dino16, device)
        workers = eval_workers(args, extractor)
        run_ours = lambda x=extractor, d=ds, w=workers: evaluate(x, d, batch_size=8, progress=False, num_workers=w)  # noqa: E731
        t = timeit(run_ours, warmup=1, repeat=args.eval_repeat)
        pairs_s = n_pairs / t["median_s"]
        # GPU check: pinned batches, copies without waiting and deferred read-back change nothing (to the bit).
        in_process = evaluate(extractor, ds, batch_size=8, progress=False, num_workers=0).records
        same = evaluate(extractor, ds, batch_size=8, progress=False, num_workers=workers).records.equals(in_process)
        log(f"eval {kind}: workers {workers} give the in-process records to the bit: {same}")
        # Projection: Single's cost is per image + per pair; the bench set has SPair's images-per-pair ratio.
        if kind == "single":
            scale = max(SPAIR_TEST_IMAGES / n_img, SPAIR_TEST_PAIRS / n_pairs)
        else:
            scale = SPAIR_TEST_PAIRS / n_pairs
        projected = t["median_s"] * scale
        # FLOPs counted on the eager twin of our model (the same operations; compiled code cannot be counted).
        eager_extractor = ours_extractor(kind, ours_eager, size, dino16, device)
        fl_total = count_flops(lambda x=eager_extractor, d=ds: evaluate(x, d, batch_size=8, progress=False))
        # Reference: pair by pair.
        ref = ReferenceFeaturizer(base, timestep=50, ensemble=e)
        if kind == "cpm":
            m_ref = build_prompt("cpm", ref.prompts, encoders=PromptEncoders(dino=dino32)).to(device)

            def dino_prompt(src, trg, m=m_ref):
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    originals = (list(src.float().cpu()), list(trg.float().cpu()))  # the authors cache DINOv2 outputs
                    return m.pair_prompts(ref.prompts, src, trg, ["cat0"], originals)[0]

            run_ref = reference_eval(ref, ds, None, args.ref_eval_pairs, device, dino_prompt)
        else:
            m_ref = build_prompt("single", ref.prompts).to(device)
            run_ref = reference_eval(ref, ds, m_ref.tokens, args.ref_eval_pairs, device)
        t_ref = timeit(run_ref, warmup=1, repeat=args.eval_repeat)
        ref_pair_s = t_ref["median_s"] / args.ref_eval_pairs
        fl_ref = count_flops(reference_eval(ref, ds, m_ref.tokens if kind == "single" else None, 1, device,
                                            dino_prompt if kind == "cpm" else None))
        res[kind] = {
            "bench_images": n_img, "bench_pairs": n_pairs, "ensemble": e,
            "ours": {**t, "pairs_per_s": pairs_s, "projected_spair_test_s": projected, "flops_per_pair": fl_total / n_pairs,
                     "records_equal_in_process": same},
            "reference": {**t_ref, "pairs_timed": args.ref_eval_pairs, "pairs_per_s": 1 / ref_pair_s,
                          "projected_spair_test_s": ref_pair_s * SPAIR_TEST_PAIRS, "flops_per_pair": fl_ref},
        }
        log(f"eval {kind}: ours {pairs_s:.2f} pairs/s (SPair test ~{projected / 60:.1f} min), "
            f"reference {1 / ref_pair_s:.2f} pairs/s (~{ref_pair_s * SPAIR_TEST_PAIRS / 60:.1f} min)")
    RESULTS["eval"] = res


SPAIR_CATEGORIES = ("cat", "dog", "horse")
SPAIR_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 281))  # (W, H) common in SPair-71k


def write_spair_like(root: Path, n_images: int, n_pairs: int, categories: int, seed: int = 0) -> None:
    """JPEG files and pair annotations laid out as SPair-71k's test split (JPEGImages/, PairAnnotation/test/,
    Layout/large/test.txt), of SPair's image sizes, with smooth random content and 10 keypoints per pair."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names, sizes = [], {}
    for i in range(n_images):
        cat = SPAIR_CATEGORIES[i % categories]
        w, h = SPAIR_SIZES[i % len(SPAIR_SIZES)]
        small = rng.random((h // 16 + 1, w // 16 + 1, 3))
        img = Image.fromarray((small * 255).astype("uint8")).resize((w, h), Image.BICUBIC)
        (root / "JPEGImages" / cat).mkdir(parents=True, exist_ok=True)
        img.save(root / "JPEGImages" / cat / f"{i:06d}.jpg", quality=90)
        sizes[i] = (w, h)
    (root / "PairAnnotation" / "test").mkdir(parents=True, exist_ok=True)
    per_cat = [[i for i in range(n_images) if i % categories == c] for c in range(categories)]
    candidates = [(c, a, b) for c, imgs in enumerate(per_cat) for a in imgs for b in imgs if a != b]
    for pid, k in enumerate(sorted(rng.choice(len(candidates), n_pairs, replace=False))):
        c, a, b = candidates[k]
        (wa, ha), (wb, hb) = sizes[a], sizes[b]
        kps = lambda w, h: [[float(x), float(y)] for x, y in zip(rng.uniform(0, w - 1, 10), rng.uniform(0, h - 1, 10))]  # noqa: E731
        name = f"{pid:06d}-{a:06d}-{b:06d}:{SPAIR_CATEGORIES[c]}"
        ann = {"pair_id": pid, "src_imname": f"{a:06d}.jpg", "trg_imname": f"{b:06d}.jpg", "src_imsize": [wa, ha, 3],
               "trg_imsize": [wb, hb, 3], "src_bndbox": [0, 0, wa - 1, ha - 1], "trg_bndbox": [0, 0, wb - 1, hb - 1],
               "category": SPAIR_CATEGORIES[c], "src_kps": kps(wa, ha), "trg_kps": kps(wb, hb), "viewpoint_variation": 0,
               "scale_variation": 0, "truncation": 0, "occlusion": 0}
        (root / "PairAnnotation" / "test" / f"{name}.json").write_text(json.dumps(ann))
        names.append(name)
    (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (root / "Layout" / "large" / "test.txt").write_text("\n".join(names) + "\n")


def section_files(args, ours, device) -> None:
    """Evaluation end to end from JPEG files in SPair-71k's layout: decoding, resizing, the DataLoader and the copies
    to the GPU are counted (the `eval` rows use in-memory images)."""
    from sdm.data import load_dataset

    res = {}
    dino16 = bench_dino(args.tiny, device).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("single", "cpm"):
            n_img, n_pairs = (args.eval_images, args.eval_pairs) if kind == "single" else (args.cpm_images, args.cpm_pairs)
            root = Path(tmp) / kind
            write_spair_like(root, n_img, n_pairs, 2 if kind == "single" else 1)
            ds = load_dataset("spair", root, split="test", image_size=args.size)
            extractor = ours_extractor(kind, ours, args.size, dino16, device)
            workers = eval_workers(args, extractor)
            run = lambda x=extractor, d=ds, w=workers: evaluate(x, d, batch_size=8, progress=False, num_workers=w)  # noqa: E731
            t = timeit(run, warmup=1, repeat=args.eval_repeat)
            scale = max(SPAIR_TEST_IMAGES / n_img, SPAIR_TEST_PAIRS / n_pairs) if kind == "single" else SPAIR_TEST_PAIRS / n_pairs
            res[kind] = {"bench_images": n_img, "bench_pairs": n_pairs, "workers": workers,
                         "ours": {**t, "pairs_per_s": n_pairs / t["median_s"], "projected_spair_test_s": t["median_s"] * scale}}
            log(f"files {kind}: {n_pairs / t['median_s']:.2f} pairs/s (SPair test ~{t['median_s'] * scale / 60:.1f} min)")
    RESULTS["files"] = res


def section_attn(args, ours, tokens, device) -> None:
    """The features (ensemble 8) and CPM evaluation of the `features`/`eval` rows under each SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    images = smooth_images(args.batch_ens8, args.size, 7, device)
    f_ours = SDFeaturizer(ours, image_size=args.size, timestep=50, ensemble=8)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                t = timeit(lambda: f_ours(images, tokens), args.warmup, args.repeat)
            res[name] = {**t, "images_per_s": args.batch_ens8 / t["median_s"]}
            log(f"features ens8 with {name} attention: {args.batch_ens8 / t['median_s']:.2f} img/s")
        except Exception as err:  # a backend the GPU or the shapes do not support
            res[name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{name}: {type(err).__name__}: {str(err)[:200]}")
    RESULTS["attn_backends"] = res


def section_profile(args, ours, tokens, device, out: Path) -> None:
    """Where the time of the rows furthest from their targets goes: torch.profiler over one featurizer call at
    ensemble 8 (`--batch-ens8` images) and over a CPM evaluation (`--profile-pairs` pairs, in-memory images, the
    `eval` row's settings), each after a warm-up run. Records the wall time with and without the profiler and the
    GPU's busy time (the sum of its kernels' times; the rest of the wall time the GPU waits on the host); the
    top kernels, the GPU's longest idle gaps with what the host did meanwhile (`gpu_gaps`), the host's operators by
    their own time and where the host waits (`sync_sites`) go to `<out>_profile_<row>.txt`."""
    from torch.profiler import ProfilerActivity, profile

    dino16 = bench_dino(args.tiny, device).to(torch.bfloat16)
    images = smooth_images(args.batch_ens8, args.size, 7, device)
    feat = SDFeaturizer(ours, image_size=args.size, timestep=50, ensemble=8)
    ds = BenchPairs(args.cpm_images, args.profile_pairs, args.size, n_categories=1)
    cpm = ours_extractor("cpm", ours, args.size, dino16, device)
    rows = {
        "features_ens8": (lambda: feat(images, tokens), args.batch_ens8, "images"),
        "eval_cpm_ens8": (lambda: evaluate(cpm, ds, batch_size=8, progress=False, num_workers=eval_workers(args, cpm)), args.profile_pairs, "pairs"),
    }
    res = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, (fn, items, unit) in rows.items():
        with torch.no_grad():
            plain = timeit(fn, warmup=1, repeat=1)["median_s"]
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                fn()
                sync()
                wall = time.perf_counter() - start
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in gpu_kernels(events)) / 1e6
        header = (f"{name}, {items} {unit}, random weights: wall {plain * 1e3:.1f} ms without the profiler, "
                  f"{wall * 1e3:.1f} ms with it")
        text = profile_table(prof, items, header, unit[:-1])
        gaps = gpu_gaps(prof)
        with torch.no_grad():
            sites = sync_sites(fn)
        path = out.with_name(f"{out.stem}_profile_{name}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        host = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
        path.write_text(f"{text}\n{name}: where the GPU idles\n{gaps}\n\n{name}: where the host's time goes\n{host}\n"
                        f"{name}: where the host waits for the GPU\n{sites}\n")
        res[name] = {"items": items, "unit": unit, "wall_s": plain, "profiled_wall_s": wall, "gpu_busy_s": busy,
                     "gpu_busy_share_of_wall": busy / plain if plain else math.nan, "table_file": path.name}
        log(f"profile {name}: wall {plain * 1e3:.0f} ms, GPU busy {busy * 1e3:.0f} ms ({100 * busy / plain:.0f} %); {path}")
    RESULTS["profile"] = res


def section_multi(args, device) -> None:
    """The scaling rows, on 1 GPU and on all `--gpus` GPUs of this machine, one `accelerate launch` after another:
    training (`train_multi.py`, 9 pairs a step, contiguous, eager and with the UNet's blocks compiled) and CPM
    evaluation (`eval_multi.py`). Needs 2 GPUs or more; skipped otherwise."""
    import subprocess

    n = args.gpus or (torch.cuda.device_count() if device.type == "cuda" else 0)
    if n < 2:
        RESULTS["multi"] = {"skipped": f"{n} GPU(s): the scaling rows need 2 or more"}
        log("multi: skipped,", RESULTS["multi"]["skipped"])
        return
    here = Path(__file__).resolve().parent
    runs = {"train_eager": ("train_multi.py", ["--no-channels-last"]),
            "train_compiled": ("train_multi.py", ["--no-channels-last", "--compile"]),
            "eval_cpm": ("eval_multi.py", [])}
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (script, extra) in runs.items():
            for procs in (1, n):
                target = Path(tmp) / f"{name}_{procs}.json"
                launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs),
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu"] if procs > 1 else [])]
                log(f"multi: {name} on {procs} GPU(s)")
                subprocess.run([*launch, str(here / script), *extra, "--out", str(target)], check=True)
                res.setdefault(name, {})[str(procs)] = json.loads(target.read_text())
            one, many = res[name]["1"], res[name][str(n)]
            rate = "steps_per_s" if name.startswith("train") else "pairs_per_s"
            res[name]["scaling"] = many[rate] / one[rate]
            log(f"multi {name}: {one[rate]:.2f} on 1 GPU, {many[rate]:.2f} on {n} ({res[name]['scaling']:.2f}x)")
    RESULTS["multi"] = {"gpus": n, **res}


def section_train(args, base, device) -> None:
    """`sdm.train.train` with the settings that trained fastest in issue 15's third round: bf16, contiguous tensors
    (`channels_last=False`), fused QKV, and the UNet's blocks compiled (`--no-compile`: eager). Rows: 9 and 3 pairs
    a step, 9 pairs eager, 3 pairs with gradient checkpointing (eager); the reference beside 9 and 3 pairs."""
    from sdm import train as train_module
    from sdm.train import TrainConfig

    res = {}
    size = args.size
    ds = BenchPairs(args.train_images, 48, size, seed=3)
    eager = optimize(copy.deepcopy(base), dtype=torch.bfloat16, channels_last=False, fuse_qkv=True)
    # inductor (torch 2.13, CPU) fails on a dynamic-batch graph of the backward: one graph per batch size there
    dynamic = False if device.type == "cpu" else None
    fast = optimize(copy.deepcopy(eager), compile=True, channels_last=False, fuse_qkv=False, dynamic=dynamic) if args.compile else eager
    rows = (("9pairs", 9, False, fast, False), ("9pairs_eager", 9, False, eager, False), ("9pairs_graph", 9, False, fast, True),
            ("9pairs_graph_eager", 9, False, eager, True), ("3pairs", 3, False, fast, False), ("3pairs_graph", 3, False, fast, True),
            ("3pairs_checkpointing", 3, True, eager, False))
    wanted = set(args.train_rows.split(",")) if args.train_rows else None
    for key, pairs, ckpt, model, graph in rows:
        if (key.endswith("_eager") and not args.compile) or (wanted is not None and key not in wanted):  # "_eager": the same as its row then
            continue
        if graph and device.type != "cuda":
            continue
        peaks = []
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last row's graph pool

        def run(steps: int, pairs=pairs, ckpt=ckpt, model=model, graph=graph) -> None:
            cfg = TrainConfig(prompt="single", steps=steps, batch_size=pairs, image_size=size, mixed_precision="bf16",
                              gradient_checkpointing=ckpt, val_every=0, checkpoint_every=10**9, log_every=10**9,
                              num_workers=2, timestep=261, cuda_graph=graph)
            with tempfile.TemporaryDirectory() as tmp:
                train_module.train(cfg, model, ds, out_dir=tmp, progress=False)

        base_alloc = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with step_window(args.train_warm, args.train_steps) as window, encode_peak(device) as marks:
            run(args.train_warm + args.train_steps + 1)
        times = [window["step_s"]]  # the window's mean step
        split = {}
        if device.type == "cuda":
            params = param_bytes(model.unet, model.text_encoder, model.vae)
            steps_peak = torch.cuda.max_memory_allocated()
            peaks.append(max([*marks, steps_peak]) - base_alloc + params)
            split = {"peak_gb_encode": (marks[1] - base_alloc + params) / 1e9 if len(marks) > 1 else None,
                     "peak_gb_steps": (steps_peak - base_alloc + params) / 1e9}
        res[key] = {"ours": {"compiled": model is fast and args.compile, "channels_last": False, "cuda_graph": graph,
                             "step_s": statistics.median(times), "steps_per_s": 1 / statistics.median(times),
                             "step_s_runs": times, "peak_gb": max(peaks) / 1e9 if peaks else None, **split}}
        log(f"train {key}: ours {1 / statistics.median(times):.2f} steps/s, peak {res[key]['ours']['peak_gb']} GB")
        RESULTS["train"] = res
        for save in SAVE:  # a call cut by its time limit keeps the rows measured so far
            save()
    if not args.train_reference:
        RESULTS["train"] = res
        return
    # FLOPs per step (ours: latents cached, so no VAE; fwd to up_blocks[1] + backward to the prompt).
    ref = ReferenceFeaturizer(base, timestep=261, ensemble=1)
    tokens = torch.nn.Parameter(build_prompt("single", ref.prompts).tokens.detach().clone())
    opt = torch.optim.Adam([tokens], lr=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    one = ds[0]
    src1, trg1 = one.src_image[None].to(device), one.trg_image[None].to(device)
    k1s, k1t, n1 = one.src_kps[None].to(device), one.trg_kps[None].to(device), torch.tensor([10], device=device)
    fl_ref_pair = count_flops(lambda: reference_train_step(ref, tokens, opt, scaler, src1, trg1, k1s, k1t, n1))
    f32 = SDFeaturizer(base, image_size=size, timestep=261)
    lat = f32.encode_images(torch.cat([src1, trg1]))

    def ours_pair_step() -> None:
        feats = f32.features_from_latents(lat, f32.encode_prompt(tokens, 2), generator=torch.Generator(device=device).manual_seed(0))
        hw = tuple(feats.shape[-2:])
        loss = sdm.loss.gaussian_cross_entropy(feats[:1], feats[1:], to_feature_coords(k1s, (size, size), hw),
                                               to_feature_coords(k1t, (size, size), hw), n1)
        loss.backward()

    fl_ours_pair = count_flops(ours_pair_step)
    tokens.grad = None
    for pairs in (9, 3):
        src = smooth_images(pairs, size, 11, device)
        trg = smooth_images(pairs, size, 12, device)
        ks = torch.rand(pairs, 10, 2, device=device) * (size - 1)
        kt = torch.rand(pairs, 10, 2, device=device) * (size - 1)
        n = torch.full((pairs,), 10, device=device)
        micro, t, peak = None, None, None
        for attempt in (None, 3):
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                micro = attempt
                t = timeit(lambda m=attempt: reference_train_step(ref, tokens, opt, scaler, src, trg, ks, kt, n, m), 2, args.repeat)
                peak = (torch.cuda.max_memory_allocated() - before + param_bytes(base.unet, base.vae, base.text_encoder)) / 1e9 if device.type == "cuda" else None
                break
            except torch.OutOfMemoryError:
                log(f"reference training at {pairs} pairs ran out of memory; retrying with micro-batches of 3 pairs")
                tokens.grad = None
                continue
        key = f"{pairs}pairs"
        if t is None:
            continue
        res.setdefault(key, {})["reference"] = {**t, "steps_per_s": 1 / t["median_s"], "micro_batch_pairs": micro, "peak_gb": peak,
                                 "flops_per_step": fl_ref_pair * pairs}
        for k in res:
            if k.startswith(key) and "ours" in res[k]:
                res[k]["ours"]["flops_per_step"] = fl_ours_pair * pairs
        log(f"train {key}: reference {1 / t['median_s']:.2f} steps/s (micro {micro}), peak {peak} GB")
    RESULTS["train"] = res


def section_attention(args, ours_eager, base, device) -> None:
    from sdm.attention import AttentionMatcher, AttentionMatcherConfig

    res = {}
    size = 512 if not args.tiny else 128
    image = smooth_images(2, size, 5, device).cpu()
    pts = torch.tensor([[size * 0.4, size * 0.55]])
    fp16 = copy.deepcopy(base).to(dtype=torch.float16) if device.type == "cuda" else base
    for name, sd in (("sdm_fp16_default", fp16), ("sdm_bf16_optimized", ours_eager)):
        cfg = AttentionMatcherConfig(image_size=size, progress=False)
        m = AttentionMatcher(sd, cfg)
        short = AttentionMatcher(sd, AttentionMatcherConfig(image_size=size, progress=False, steps=args.attn_steps))
        t_opt = timeit(lambda s=short: s.optimize_embeddings(image[0], pts), 1, args.attn_repeat)
        emb = short.optimize_embeddings(image[0], pts).embeddings
        t_inf = timeit(lambda mm=m, e=emb: mm.attention_maps(image[1], e), 1, args.attn_repeat)
        per_step = t_opt["median_s"] / args.attn_steps
        per_point = per_step * cfg.steps + t_inf["median_s"]
        res[name] = {"opt_step_s": per_step, "inference_s": t_inf["median_s"], "seconds_per_point": per_point,
                     "opt_runs_s": t_opt["times_s"], "inference_runs_s": t_inf["times_s"]}
        log(f"attention {name}: {per_point:.2f} s per query point ({per_step * 1e3:.1f} ms/step x {cfg.steps} + {t_inf['median_s']:.2f} s)")
    one = AttentionMatcher(base, AttentionMatcherConfig(image_size=size, progress=False, steps=1))
    fl_step = count_flops(lambda: one.optimize_embeddings(image[0], pts))
    fl_inf = count_flops(lambda: one.attention_maps(image[1], emb))
    for v in res.values():
        v["flops_per_point"] = fl_step * AttentionMatcherConfig().steps + fl_inf
    RESULTS["attention"] = res
    del fp16


def table(peak_tflops: float) -> str:
    rows = []

    def mfu(flops, seconds):
        return 100 * flops / seconds / 1e12 / peak_tflops if seconds and peak_tflops == peak_tflops else float("nan")

    f = RESULTS.get("features", {})
    for e in ("ens1", "ens8"):
        if e in f:
            o, r = f[e]["ours"], f[e]["reference"]
            rows.append((f"features t=50 {e} (img/s)", o["images_per_s"], r["images_per_s"],
                         mfu(o["flops_per_image"], 1 / o["images_per_s"]), mfu(r["flops_per_image"], 1 / r["images_per_s"]),
                         o["flops_per_image"] / 1e12, r["flops_per_image"] / 1e12))
    ev = RESULTS.get("eval", {})
    for k in ("single", "cpm"):
        if k in ev:
            o, r = ev[k]["ours"], ev[k]["reference"]
            rows.append((f"eval {k} ens8 (pairs/s)", o["pairs_per_s"], r["pairs_per_s"],
                         mfu(o["flops_per_pair"], 1 / o["pairs_per_s"]), mfu(r["flops_per_pair"], 1 / r["pairs_per_s"]),
                         o["flops_per_pair"] / 1e12, r["flops_per_pair"] / 1e12))
            rows.append((f"  SPair test {k} (min)", o["projected_spair_test_s"] / 60, r["projected_spair_test_s"] / 60,
                         float("nan"), float("nan"), float("nan"), float("nan")))
    for k, v in RESULTS.get("files", {}).items():
        rows.append((f"eval {k} ens8 from JPEG (pairs/s)", v["ours"]["pairs_per_s"], math.nan, math.nan, math.nan, math.nan, math.nan))
        rows.append((f"  SPair test {k}, JPEG (min)", v["ours"]["projected_spair_test_s"] / 60, math.nan, math.nan, math.nan, math.nan, math.nan))
    for k, v in RESULTS.get("attn_backends", {}).items():
        if "images_per_s" in v:
            fl = f.get("ens8", {}).get("ours", {}).get("flops_per_image", math.nan)
            rows.append((f"features ens8, {k} attention (img/s)", v["images_per_s"], math.nan, mfu(fl, 1 / v["images_per_s"]), math.nan, fl / 1e12, math.nan))
    tr = RESULTS.get("train", {})
    for k, v in tr.items():
        if "ours" not in v:
            continue
        o, r = v["ours"], v.get("reference", {})
        rows.append((f"train {k} (steps/s)", o["steps_per_s"], r.get("steps_per_s", float("nan")),
                     mfu(o.get("flops_per_step", math.nan), o["step_s"]), mfu(r.get("flops_per_step", math.nan), r.get("median_s")),
                     o.get("flops_per_step", math.nan) / 1e12, r.get("flops_per_step", math.nan) / 1e12))
        rows.append((f"  peak GB {k}", o["peak_gb"] or math.nan, r.get("peak_gb") or math.nan, math.nan, math.nan, math.nan, math.nan))
    at = RESULTS.get("attention", {})
    if at:
        o, r = at["sdm_bf16_optimized"], at["sdm_fp16_default"]
        rows.append(("attention matcher (s/point)", o["seconds_per_point"], r["seconds_per_point"],
                     mfu(o["flops_per_point"], o["seconds_per_point"]), mfu(r["flops_per_point"], r["seconds_per_point"]),
                     o["flops_per_point"] / 1e12, r["flops_per_point"] / 1e12))
    mu = RESULTS.get("multi", {})
    for name, label, rate in (("train_eager", "train 9pairs eager", "steps_per_s"), ("train_compiled", "train 9pairs", "steps_per_s"),
                              ("eval_cpm", "eval cpm ens8 no compile", "pairs_per_s")):
        if name in mu:
            n = mu["gpus"]
            rows.append((f"{label}, {n} GPUs (1 GPU as ref)", mu[name][str(n)][rate], mu[name]["1"][rate], math.nan, math.nan, math.nan, math.nan))
    for name, v in RESULTS.get("profile", {}).items():
        rows.append((f"  GPU busy {name} (%)", 100 * v["gpu_busy_share_of_wall"], math.nan, math.nan, math.nan, math.nan, math.nan))
    head = f"{'row':34s} {'ours':>10s} {'ref':>10s} {'ours/ref':>9s} {'MFU ours':>9s} {'MFU ref':>8s} {'TF ours':>8s} {'TF ref':>8s}"
    lines = [head]
    for name, o, r, mo, mr, fo, fr in rows:
        ratio = o / r if r else math.nan
        if "s/point" in name or "(min)" in name or "peak" in name:
            ratio = r / o if o else math.nan  # lower is better: the speed-up / saving factor
        lines.append(f"{name:34s} {o:10.3f} {r:10.3f} {ratio:9.2f} {mo:8.1f}% {mr:7.1f}% {fo:8.3f} {fr:8.3f}")
    RESULTS["table"] = lines
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--merge", action="store_true", help="add this call's sections to --out's (an earlier call on the same "
                    "machine: the whole harness takes longer than one call may run on an H100); refuses another GPU model")
    ap.add_argument("--sections", default="checks,features,eval,train,attention,files,attn,profile,multi")
    ap.add_argument("--tiny", action="store_true", help="tiny model at 128 px (smoke test)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch-ens1", type=int, default=16)
    ap.add_argument("--batch-ens8", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--eval-images", type=int, default=25)
    ap.add_argument("--eval-pairs", type=int, default=170)
    ap.add_argument("--cpm-images", type=int, default=24)
    ap.add_argument("--cpm-pairs", type=int, default=256)
    ap.add_argument("--ref-eval-pairs", type=int, default=4)
    ap.add_argument("--eval-repeat", type=int, default=2)
    ap.add_argument("--eval-workers", type=int, default=4, help="DataLoader workers for CPM evaluation")
    ap.add_argument("--train-images", type=int, default=12)
    ap.add_argument("--train-warm", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=16)
    ap.add_argument("--train-rows", default=None, help="comma-separated rows of the train section (default: all), e.g. 9pairs,9pairs_graph")
    ap.add_argument("--no-train-reference", dest="train_reference", action="store_false", help="train section without the reference rows")
    ap.add_argument("--profile-pairs", type=int, default=64, help="CPM pairs evaluated under the profiler")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs of the multi section (default: all visible)")
    ap.add_argument("--attn-steps", type=int, default=10)
    ap.add_argument("--attn-repeat", type=int, default=2)
    args = ap.parse_args()
    args.size = args.size or (128 if args.tiny else 768)
    device = sdm.models.default_device()
    sections = args.sections.split(",")
    out = Path(args.out)
    calls = merge_earlier(out) if args.merge else []
    section_env(args, device)
    check_same_machine(calls, RESULTS["env"])
    RESULTS["calls"] = [*calls, {"sections": args.sections, "env": RESULTS["env"]}]
    if set(sections) - {"multi"}:  # the multi section starts its own processes
        base, ours, ours_eager = build_models(args, device)
        tokens = build_prompt("single", SDFeaturizer(base, image_size=args.size)).tokens.detach()

    def dump() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), **RESULTS}, indent=2, default=str))

    SAVE.append(dump)

    steps = {
        "checks": lambda: section_checks(args, base, ours, ours_eager, tokens, device),
        "features": lambda: section_features(args, base, ours, tokens, device),
        "eval": lambda: section_eval(args, base, ours, ours_eager, device),
        "train": lambda: section_train(args, base, device),
        "attention": lambda: section_attention(args, ours_eager, base, device),
        "files": lambda: section_files(args, ours, device),
        "attn": lambda: section_attn(args, ours, tokens, device),
        "profile": lambda: section_profile(args, ours, tokens, device, out),
        "multi": lambda: section_multi(args, device),
    }
    for name in sections:
        start = time.perf_counter()
        try:
            steps[name]()
        except Exception as err:  # keep the other sections' numbers
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
        RESULTS.setdefault("section_s", {})[name] = time.perf_counter() - start
        log(f"[{name} done in {time.perf_counter() - start:.0f} s]")
        dump()
    env = RESULTS["env"]
    print(f"\n{env.get('gpu') or 'CPU (no GPU)'} | weights {WEIGHTS} | torch {env['torch']} | diffusers {env['diffusers']} | transformers {env['transformers']} | {env['date_utc']}")
    print("checks:", json.dumps(RESULTS.get("checks_rel_err_vs_plain_fp32")))
    print(table(env["matmul_bf16_tflops"]))
    dump()


if __name__ == "__main__":
    main()
