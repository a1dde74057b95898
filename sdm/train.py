"""Prompt training with Hugging Face Accelerate (SD4Match's recipe), resumable to the step.

Everything random is derived from (seed, step, process): the data order from per-epoch permutations of
the seed, the diffusion noise from a generator seeded per step. So a run interrupted and resumed from its
checkpoint computes exactly the steps an uninterrupted run would, and ends with the same prompt.
"""

from __future__ import annotations

import contextlib
import csv
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from sdm.backbones import build_backbone
from sdm.config import TrainConfig, recipe
from sdm.data import PairDataset, collate_pairs, dataset_record, decoding, load_images
from sdm.devices import upload
from sdm.draws import BatchRows
from sdm.encoders import PromptEncoders, encoder_name
from sdm.evaluate import evaluate
from sdm.extractors import SDExtractor
from sdm.features import SDFeaturizer
from sdm.loss import gaussian_cross_entropy
from sdm.matching import to_feature_coords
from sdm.models import StableDiffusion
from sdm.prompt_files import save_prompt
from sdm.prompts import PromptModule, build_prompt, originals_for
from sdm.records import code_record, environment_record
from sdm.runs import CHECKPOINT, RunExistsError, claim_run_folder
from sdm.step_graph import StepGraphs, pad_rows
from sdm.storage import atomic_write

if TYPE_CHECKING:
    from accelerate import Accelerator



def validation_interval(cfg: TrainConfig, n_train: int) -> int:
    """Steps between validations: `cfg.val_every`, or one epoch of the training set for "epoch" (0: never)."""
    if cfg.val_every == "epoch":
        return max(1, math.ceil(n_train / cfg.batch_size))
    return int(cfg.val_every)


# Settings that may change when a run is resumed (the rest must match the checkpoint).
_RESUMABLE_CHANGES = {"cuda_graph", "steps", "val_every", "val_pairs", "checkpoint_every", "log_every", "num_workers"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    prompt: PromptModule
    log: pd.DataFrame  # one row per logged step: step, loss, val_pck (NaN when not validated)
    best_pck: float | None
    best_step: int | None
    out_dir: Path


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data order's permutation in `epoch`: distinct for every (seed, epoch) of a run (the prime
    1,000,003 keeps nearby seeds from sharing epochs' orders)."""
    return seed * 1_000_003 + epoch


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the posterior and noise draws of `step`: a function of (seed, step) alone, so a resumed run draws
    what the uninterrupted run drew. Training draws for the whole batch on every process (`rank` 0, the default;
    other ranks give other streams)."""
    return seed * 1_000_003 + step * 997 + rank


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at `step`: consecutive slices of a stream of per-epoch permutations."""
    if n == 0:
        raise ValueError("the training set is empty")
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        take = perm[offset : offset + batch_size - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def pairs_of_steps(n: int, batch_size: int, start: int, stop: int, seed: int) -> list[int]:
    """The distinct dataset indices that the global batches of steps `start..stop-1` draw (`batch_indices`),
    sorted: what a run (or the rest of a resumed one) will read, found epoch by epoch without building batches."""
    first, last = start * batch_size, max(start, stop) * batch_size
    if n == 0 or first == last:
        return []
    used: set[int] = set()
    for epoch in range(first // n, (last - 1) // n + 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        lo, hi = max(first - epoch * n, 0), min(last - epoch * n, n)
        used.update(perm[lo:hi].tolist())
        if len(used) == n:
            break
    return sorted(used)


class StepBatchSampler(Sampler[list[int]]):
    """The global batches of steps `start..stop-1` (every process loads the whole batch: `image_share`)."""

    def __init__(self, n: int, batch_size: int, start: int, stop: int, seed: int) -> None:
        self.n, self.batch_size, self.start, self.stop, self.seed = n, batch_size, start, stop, seed

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield batch_indices(self.n, self.batch_size, step, self.seed)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ---- data parallel over images -----------------------------------------------------------------------------------
# A batch of B pairs is 2B images, src_1..src_B, trg_1..trg_B. Each process computes the features of a contiguous
# share of them (sizes differ by at most one: 18 images are 9 + 9 on 2 GPUs, 5 + 5 + 4 + 4 on 4), with the draws the
# whole batch would get (`BatchRows`); the features are gathered, every process computes the loss of the whole
# batch from them (the same number everywhere), and the prompt gradients of the shares are summed. So a step on N
# processes computes what it computes on one, and no process waits on a larger share of pairs.
def image_share(n_images: int, rank: int, world: int) -> slice:
    """The rows of `n_images` whose features process `rank` of `world` computes (the first n % world take one more)."""
    base, extra = divmod(n_images, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class _GatherRows(torch.autograd.Function):
    """Every process's rows, concatenated in rank order. Backward keeps this process's rows of the gradient: every
    process computes the same loss from the gathered rows, so its gradient is already the whole batch's."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        longest = max(sizes)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad[ctx.start : ctx.stop], None, None


def _gather_rows(local: torch.Tensor, n_images: int, rank: int, world: int) -> torch.Tensor:
    """The features of all `n_images` from each process's `image_share` (differentiable; world 1: `local`)."""
    if world == 1:
        return local
    shares = [image_share(n_images, r, world) for r in range(world)]
    return _GatherRows.apply(local, [share.stop - share.start for share in shares], rank)


def _encode_rows(featurizer: SDFeaturizer, prompt: Any, rows: slice, b: int) -> torch.Tensor:
    """Encoder hidden states of `rows` of a batch of b prompts (one prompt broadcast, B prompts sliced first), so
    a process encodes only the prompts of its image share."""
    n = rows.stop - rows.start
    per_item = (isinstance(prompt, torch.Tensor) and prompt.dim() == 3 and prompt.shape[0] == b and b > 1) or (
        isinstance(prompt, list) and len(prompt) == b and b > 1
    )
    return featurizer.encode_prompt(prompt[rows] if per_item else prompt, n)


def _sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduces (sums) the gradients of `params` over the processes in one bucket; a missing gradient counts as
    zeros (Adam leaves a parameter whose gradients and moments are all zero where it is)."""
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, part in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        if p.grad is None:
            p.grad = part.view_as(p)
        else:  # in place: a CUDA graph's optimiser step reads the gradient tensors it was captured with
            p.grad.copy_(part.view_as(p))


_RANDOM_WEIGHTS_LOG = "# random weights: this training only shows that the loop runs"


def _write_log(rows: list[dict[str, Any]], path: Path, random_weights: bool = False) -> None:
    """log.csv: step, loss, val_pck; headed by a comment line when the model has random weights (read it with
    `pandas.read_csv(path, comment="#")`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            if random_weights:
                fh.write(_RANDOM_WEIGHTS_LOG + "\n")
            writer = csv.DictWriter(fh, fieldnames=["step", "loss", "val_pck"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _check_resume(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = asdict(cfg)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        raise ValueError("cannot resume: the settings differ from the checkpoint's:\n  " + "\n  ".join(diff))


def train(
    cfg: TrainConfig,
    sd: StableDiffusion,
    train_set: PairDataset,
    val_set: PairDataset | None = None,
    *,
    out_dir: str | Path = "runs/train",
    encoders: PromptEncoders | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains a prompt of `cfg.prompt` on `train_set` and returns it with its log.

    Writes into out_dir: checkpoint.pt (every `checkpoint_every` steps and at the end, atomically), prompt.*
    (the latest learned prompt, `sdm.prompt_files.load_prompt` reads it), best.* (best validation PCK@0.1),
    log.csv. With `resume`, continues from out_dir/checkpoint.pt exactly where it stopped.

    A folder that already holds a run is refused (RunExistsError) unless `resume` continues it or `overwrite`
    deletes its run files first, so two runs never mix. Every saved prompt records the run's id
    (metadata "run"), kept across resumes.

    Raises TrainingDiverged when a loss is NaN or infinite, naming its step (checked on the device at every step and
    read at the next step that logs, validates or saves; the last checkpoint is left as it was).

    Under `accelerate launch` with N processes, each computes the features of its share of the batch's images
    (`image_share`) and the gradients are summed: the step computes what it computes on one process.
    """
    out = Path(out_dir)
    claim_run_folder(out, resume, overwrite)
    from accelerate import Accelerator

    log_with = "tensorboard" if _has_tensorboard() else None
    # Precision is this run's (autocast and scaler below), not Accelerate's process-wide setting, so runs of other
    # precisions can follow in one process without touching Accelerate's state.
    accelerator = Accelerator(log_with=log_with, project_dir=str(out))
    with _lent(sd, encoders, accelerator.device, cfg.gradient_checkpointing):
        return _train(cfg, sd, train_set, val_set, out, encoders, resume, progress, accelerator, log_with)


@contextlib.contextmanager
def _lent(sd: StableDiffusion, encoders: PromptEncoders | None, device: torch.device, checkpointing: bool) -> Iterator[None]:
    """The models on `device`, gradient checkpointing as the run asks, for the run; as they were afterwards."""
    modules: list[torch.nn.Module] = sd.modules()
    if encoders is not None:
        modules += [enc for enc in (encoders.dino, encoders.clip) if enc is not None]
    homes = [next(m.parameters()).device for m in modules]
    was_checkpointing = sd.unet.is_gradient_checkpointing
    try:
        for m in modules:
            m.to(device)
        if checkpointing != was_checkpointing:
            sd.unet.enable_gradient_checkpointing() if checkpointing else sd.unet.disable_gradient_checkpointing()
        yield
    finally:
        if sd.unet.is_gradient_checkpointing != was_checkpointing:
            sd.unet.enable_gradient_checkpointing() if was_checkpointing else sd.unet.disable_gradient_checkpointing()
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


def _check_graphable(cfg: TrainConfig, world: int, module: PromptModule) -> None:
    """Refuses the settings that `cfg.cuda_graph` does not support (the device is checked by `StepGraphs`, the cached
    latents once the data is set up)."""
    if not cfg.cuda_graph:
        return
    if module.conditioning != "fixed":
        raise ValueError(f"cuda_graph=True supports prompts that do not depend on the pair (Single); {cfg.prompt!r} is "
                         f"{module.conditioning}-conditioned. Set cuda_graph=False.")  # fmt: skip
    if world > 1:
        raise ValueError(f"cuda_graph=True runs on one process for now ({world} launched); set cuda_graph=False.")
    if cfg.gradient_checkpointing:
        raise ValueError("cuda_graph=True and gradient_checkpointing=True do not go together (checkpointing saves the "
                         "random-number state on the host); choose one.")  # fmt: skip


def _precision(
    mixed_precision: str, device: torch.device, cache: bool = True
) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler | None, str]:
    """The run's autocast context factory (`cache`: autocast's cache of cast weights), for fp16 its loss scaler
    (what Accelerate's `mixed_precision` sets up: torch.autocast of that dtype, a default GradScaler for fp16), and
    the precision it computes in."""
    if mixed_precision == "no":
        return contextlib.nullcontext, None, "float32"
    if mixed_precision == "fp16" and device.type == "cpu":
        return contextlib.nullcontext, None, "float32"  # as Accelerate (1.x) does, silently; `_train` says so
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)), scaler, f"{mixed_precision} autocast"


def _train(
    cfg: TrainConfig,
    sd: StableDiffusion,
    train_set: PairDataset,
    val_set: PairDataset | None,
    out: Path,
    encoders: PromptEncoders | None,
    resume: bool,
    progress: bool,
    accelerator: Accelerator,
    log_with: str | None,
) -> TrainResult:
    run = _Run(cfg, sd, train_set, val_set, out, encoders, accelerator, log_with)
    if resume:
        run.resume()
    return run.loop(progress)


class _Run:
    """One training run, in the order it happens: set up (`__init__`), `resume`, `data` (latents encoded up
    front, the step batches), `step` (one optimiser step), `validate`, `save`, and `loop`, which drives them."""

    def __init__(
        self, cfg: TrainConfig, sd: StableDiffusion, train_set: PairDataset, val_set: PairDataset | None, out: Path,
        encoders: PromptEncoders | None, accelerator: Accelerator, log_with: str | None,
    ) -> None:  # fmt: skip
        self.cfg, self.sd, self.train_set, self.val_set, self.out = cfg, sd, train_set, val_set, out
        self.accelerator, self.log_with, self.device = accelerator, log_with, accelerator.device
        # autocast's cache of cast weights would hold tensors of a graph's pool between replays
        self.autocast, self.scaler, precision = _precision(cfg.mixed_precision, self.device, cache=not cfg.cuda_graph)
        if cfg.mixed_precision != "no" and precision == "float32":
            accelerator.print(f"note: mixed_precision {cfg.mixed_precision!r} needs a GPU: training in float32 on the "
                              f"{self.device.type} (prompt.json records the precision used under run.precision)")  # fmt: skip
        self.backbone = build_backbone(cfg.backbone, encoders, cfg.image_size)
        features = dict(image_size=cfg.image_size, up_block=cfg.up_block, seed=cfg.seed)
        self.featurizer = self.backbone.featurizer(sd, timestep=cfg.timestep, ensemble=cfg.ensemble, **features)  # type: ignore[arg-type]
        self.val_featurizer = self.backbone.featurizer(sd, timestep=cfg.val_timestep, ensemble=cfg.val_ensemble, **features)  # type: ignore[arg-type]
        self.module = build_prompt(cfg.prompt, self.featurizer, categories=train_set.categories, encoders=encoders, cpm=cfg.cpm, seed=cfg.seed)
        # the fused kernel on GPUs: one launch for all tensors, and with fp16 the scaler's inf check stays on the device
        _check_graphable(cfg, accelerator.num_processes, self.module)
        self.graphs = StepGraphs(self.device) if cfg.cuda_graph else None
        self.optimizer = torch.optim.Adam(
            self.module.parameter_groups(cfg.lr, cfg.lr_linear), fused=self.device.type == "cuda", capturable=self.graphs is not None
        )
        self.extractor = SDExtractor(self.featurizer, self.module, encode_batch=ENCODE_BATCH)  # its latent cache serves training
        self.step_no, self.rows, self.best_pck, self.best_step, self.saved_step = 0, [], None, None, None
        self.run_id = uuid.uuid4().hex[:12]
        self.ckpt_path = out / CHECKPOINT
        self.trained_on = {**dataset_record(train_set), "dino": encoder_name(encoders.dino if encoders else None)}
        if val_set is not None:
            self.trained_on["validation"] = dataset_record(val_set)
        self.precision = precision
        self.where = {**code_record(), "environment": environment_record(str(self.device))}  # once per run

    def resume(self) -> None:
        """Continues from the folder's checkpoint: prompt, optimiser, scaler, log and best so far."""
        if not self.ckpt_path.is_file():
            self.accelerator.print(f"no checkpoint at {self.ckpt_path}; starting from step 0")
            return
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)  # tensors and plain values only
        _check_resume(state["config"], self.cfg)
        self.run_id = state.get("run_id", self.run_id)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for k, v in state["prompt"].items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a speed setting of this run, not of the saved one
            group["capturable"] = self.graphs is not None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step_no, self.rows, self.best_pck, self.best_step = state["step"], state["log"], state["best_pck"], state["best_step"]
        self.saved_step = self.step_no

    def data(self) -> DataLoader:
        """The batches of the remaining steps. Prompts that never look at the resized images (Single, Class, CPM
        on the originals) need only the images' latents: the images those steps draw are encoded once here, then
        only keypoints are loaded (no resized image decoded or moved per step; CPM still reads the originals)."""
        cfg, start = self.cfg, self.step_no
        pairs = pairs_of_steps(len(self.train_set), cfg.batch_size, start, cfg.steps, cfg.seed)
        self.skip_images = not self.backbone.needs_images and _preencode_latents(self.extractor, self.train_set, self.module, self.device, pairs)
        if self.graphs is not None and not self.skip_images:
            raise ValueError("cuda_graph=True needs the training images' latents kept in the cache (a backbone that does not "
                             "look at the images, a training set of decoded images). Set cuda_graph=False.")  # fmt: skip
        # a view: the caller's set stays as it is
        self.train_set = decoding(self.train_set, self.train_set.decode_images and not self.skip_images)
        sampler = StepBatchSampler(len(self.train_set), cfg.batch_size, start, cfg.steps, cfg.seed)
        return DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_pairs, pin_memory=self.device.type == "cuda"
        )

    def step(self, batch: Any) -> torch.Tensor:
        """One optimiser step on `batch`; returns its loss (on the device: reading it costs a host sync)."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        batch = batch.to(self.device, non_blocking=True)
        b = len(batch)
        mine = image_share(2 * b, rank, world)
        ids = [*batch.src_ids, *batch.trg_ids][mine]
        images = torch.cat([batch.src_image, batch.trg_image])[mine]
        # the VAE's posteriors of this process's images, from the latent cache (encoded here when not yet kept)
        with self.autocast():
            posterior = self.extractor.posteriors(ids, lambda idx: images[idx])
        inputs = {"posterior": posterior, "src_kps": batch.src_kps, "trg_kps": batch.trg_kps, "n_kps": batch.n_kps}
        seed = step_seed(self.cfg.seed, self.step_no)

        def body(t: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
            return self._step_body(t, generator, batch, images, mine)

        if self.graphs is None:
            loss = body(inputs, torch.Generator(device=self.device).manual_seed(seed))
        else:  # keypoints padded to a multiple of 8: a few graphs, not one per keypoint count
            inputs.update(src_kps=pad_rows(batch.src_kps, 8), trg_kps=pad_rows(batch.trg_kps, 8))
            loss = self.graphs(body, inputs, seed)
        self.step_no += 1
        return loss

    def _step_body(self, t: dict[str, torch.Tensor], g: torch.Generator, batch: Any, images: torch.Tensor, mine: slice) -> torch.Tensor:
        """Forward, backward and optimiser step from the tensors `t` (what a CUDA graph replays: nothing here reads
        a device value on the host or copies from the host; `batch`'s host fields are read only by the prompts
        that the graph refuses, those conditioned on categories or images)."""
        cfg, module, featurizer = self.cfg, self.module, self.featurizer
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        b = t["n_kps"].shape[0]
        self.optimizer.zero_grad(set_to_none=self.graphs is None)  # a graph accumulates into the gradients it captured
        draws = BatchRows(g, mine.start, mine.stop, 2 * b) if world > 1 else g
        # CPM's DINOv2 input: the images as stored (None for prompts that do not look at them)
        originals = tuple(originals_for(module, ids, self.train_set.original_image) for ids in (batch.src_ids, batch.trg_ids))
        with self.autocast():
            p_src, p_trg = module.pair_prompts(featurizer, batch.src_image, batch.trg_image, batch.categories, originals)  # type: ignore[arg-type]
            src_rows, trg_rows = slice(min(mine.start, b), min(mine.stop, b)), slice(max(mine.start, b) - b, max(mine.stop, b) - b)
            hidden = torch.cat([_encode_rows(featurizer, p, r, b) for p, r in ((p_src, src_rows), (p_trg, trg_rows)) if r.stop > r.start])
            # a fresh posterior draw and fresh noise at every step, as the authors' training calls the VAE's
            # latent_dist.sample() and randn_like each time (sd_feature_extractor.py:76,111)
            lat = featurizer.sample_latents(t["posterior"], generator=draws)
            feats = featurizer.features_from_latents(lat, hidden, generator=draws)
        feats = _gather_rows(self.backbone.features(feats, images), 2 * b, rank, world)  # "sd": feats as they are
        src_f, trg_f = feats[:b].float(), feats[b:].float()
        size = tuple(self.train_set.image_size) if self.skip_images else tuple(batch.src_image.shape[-2:])
        src_xy = to_feature_coords(t["src_kps"], size, tuple(src_f.shape[-2:]))
        trg_xy = to_feature_coords(t["trg_kps"], size, tuple(trg_f.shape[-2:]))
        loss = gaussian_cross_entropy(src_f, trg_f, src_xy, trg_xy, t["n_kps"], temperature=cfg.temperature, kernel_size=cfg.kernel_size, sigma=cfg.sigma)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if world > 1:  # the prompt module is not DDP-wrapped: sum the shares' gradients
            _sum_gradients(list(module.parameters()))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach()

    def validate(self) -> float | None:
        """PCK@0.1 on the validation split (main process); a new best is saved as best.*."""
        if self.val_set is None or not self.accelerator.is_main_process:
            return None
        extractor = self.backbone.extractor(SDExtractor(self.val_featurizer, self.module))
        result = evaluate(extractor, self.val_set, matcher=self.cfg.val_matcher, max_pairs=self.cfg.val_pairs, progress=False)
        pck = float(result.table.loc["all", "per_image@0.1"])
        if self.best_pck is None or pck > self.best_pck:
            self.best_pck, self.best_step = pck, self.step_no
            self._save_prompt("best")
        return pck

    def save(self) -> None:
        """checkpoint.pt, prompt.* and log.csv of this step (main process), each written atomically."""
        self.saved_step = self.step_no
        if not self.accelerator.is_main_process:
            return
        state = {
            "step": self.step_no, "config": asdict(self.cfg), "prompt": {k: v.cpu() for k, v in self.module.trainable_state().items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "log": self.rows, "best_pck": self.best_pck, "best_step": self.best_step, "run_id": self.run_id,
        }  # fmt: skip
        atomic_write(self.ckpt_path, lambda tmp: torch.save(state, tmp))
        self._save_prompt("prompt")
        _write_log(self.rows, self.out / "log.csv", self.sd.random_weights)

    def _save_prompt(self, name: str) -> None:
        # what the run is and where it ran (prompt.json's "run"): its id is kept across resumes
        run = {"id": self.run_id, "folder": str(self.out.resolve()), "precision": self.precision, **self.where}
        save_prompt(self.module, self.out / name, self.featurizer, step=self.step_no, train_config=asdict(self.cfg), trained_on=self.trained_on, run=run)

    def loop(self, progress: bool) -> TrainResult:
        """Steps to `cfg.steps`, logging, validating and saving on their schedules; stops on a non-finite loss."""
        cfg, accelerator, start = self.cfg, self.accelerator, self.step_no
        loader = self.data()
        val_every = validation_interval(cfg, len(self.train_set))
        if self.log_with and accelerator.is_main_process:
            accelerator.init_trackers("sdm-train")
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.prompt}", disable=not (progress and accelerator.is_main_process))
        # The first step whose loss was not finite, and that loss (-1: none), kept on the device: reading it costs a
        # host sync, so it is read only when a step logs, validates or saves (nothing bad is ever saved).
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), device=self.device)
        try:
            for batch in loader:
                loss = self.step(batch)
                first_bad = (bad_step < 0) & ~torch.isfinite(loss)
                bad_step = torch.where(first_bad, self.step_no, bad_step)
                bad_loss = torch.where(first_bad, loss, bad_loss)
                bar.update(1)
                step = self.step_no
                logging = step % cfg.log_every == 0 or step == cfg.steps
                validating = bool(val_every) and step % val_every == 0
                saving = step % cfg.checkpoint_every == 0 or step == cfg.steps
                if not (logging or validating or saving):
                    continue
                if int(bad_step) >= 0:
                    raise TrainingDiverged(
                        f"the loss became {float(bad_loss)} at step {int(bad_step)}; training stopped. The last good "
                        f"checkpoint ({self.ckpt_path}, step {self.saved_step}) is kept: lower the learning rate or "
                        "use mixed_precision='bf16'/'no', then resume."
                    )
                self._record(float(loss), self.validate() if validating else None, logging, bar)
                if saving:
                    self.save()
        finally:
            bar.close()
            if self.log_with:
                accelerator.end_training()
        if accelerator.is_main_process and self.step_no == start:  # nothing to do (already at cfg.steps): keep files consistent
            self.save()
        return TrainResult(self.module, pd.DataFrame(self.rows, columns=["step", "loss", "val_pck"]), self.best_pck, self.best_step, self.out)

    def _record(self, loss: float, val_pck: float | None, logging: bool, bar: Any) -> None:
        """A log row (the whole batch's loss: the same on every process) when the step logs or validated."""
        if not (logging or val_pck is not None):
            return
        self.rows.append({"step": self.step_no, "loss": loss, "val_pck": val_pck if val_pck is not None else math.nan})
        val = {"val": f"{val_pck:.1f}" + (" (random weights)" if self.sd.random_weights else "")} if val_pck is not None else {}
        bar.set_postfix(loss=f"{loss:.3f}", **val)
        if self.log_with:
            self.accelerator.log({"loss": loss, **({"val_pck": val_pck} if val_pck is not None else {})}, step=self.step_no)


ENCODE_BATCH = 8  # images per VAE call in training (padded: `FeatureStore.fetch`)


def _preencode_latents(extractor: SDExtractor, train_set: PairDataset, module: PromptModule, device: torch.device, pairs: list[int]) -> bool:
    """Fills the extractor's latent cache with the images of the training pairs `pairs` (those the run's steps
    draw) when the prompt does not look at the resized images (`needs_images`: Single, Class, CPM with DINOv2 on
    the originals) and the cache holds them all, `ENCODE_BATCH` images per VAE call; returns whether the training
    loop may then skip loading images."""
    if module.needs_images or not train_set.decode_images:
        return False
    labels = decoding(train_set, False)  # pairs without their images: ids and keypoints only
    ids = list(dict.fromkeys(k for i in pairs for k in (labels[i].src_id, labels[i].trg_id)))
    if len(ids) > extractor.store.capacity:
        return False
    for i in range(0, len(ids), ENCODE_BATCH):
        chunk = ids[i : i + ENCODE_BATCH]
        images = upload(load_images(train_set, chunk), device)
        extractor.posteriors(chunk, lambda idx, images=images: images[idx])
    return True


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = [  # TrainConfig, recipe (sdm.config) and RunExistsError (sdm.runs) are re-exported: train() takes and raises them
    "ENCODE_BATCH",
    "RunExistsError",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "batch_indices",
    "epoch_seed",
    "image_share",
    "pairs_of_steps",
    "recipe",
    "step_seed",
    "train",
    "validation_interval",
]
