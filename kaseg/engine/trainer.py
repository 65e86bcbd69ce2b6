"""The one training loop of kaseg, shared by every stage.

Lifecycle of :func:`fit`, one function per step:

1. ``_prepare``: move the job's modules to the device (channels_last, SyncBatchNorm as
   configured) and build the optimizer, the poly schedule and the AMP grad scaler;
2. ``_restore``, when resuming: the trainable weights, optimizer, scheduler, scaler, RNG
   states and the iteration (which fixes the data position, see ``kaseg.data.loader``);
   then ``_wrap`` puts the module in DDP and ``torch.compile`` as configured;
3. ``_train_step``, each iteration: ``losses = job.module(images, masks)`` (a dict of
   named, already weighted loss terms), their sum is back-propagated; a non-finite term
   stops the run before any weight or checkpoint changes;
4. every ``log_every`` iterations ``_ProgressLog.log`` (progress bar, metrics.jsonl,
   TensorBoard); every ``eval_every`` and at the end ``_evaluate_and_keep_best``
   (``job.evaluate()``, keeping ``best.pt``);
5. ``_save``, every ``checkpoint_every`` and at the end: ``last.pt``, holding only
   tensors and plain data so that it reads back with ``weights_only=True``.

What differs between stages (teacher or student with cross-entropy, the auto-encoder,
distillation) is only the :class:`TrainingJob`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kaseg.config import Config, to_dict
from kaseg.data.loader import train_loader
from kaseg.engine.checkpoint import CheckpointError, check_arch, load_checkpoint, save_checkpoint
from kaseg.engine.distributed import convert_sync_batchnorm, is_main_process, rank, world_size
from kaseg.engine.logger import RunLogger
from kaseg.engine.schedule import poly_lr

logger = logging.getLogger("kaseg")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and the term."""


@dataclass
class TrainingJob:
    """What one stage trains.

    Attributes:
        module: ``forward(images, masks)`` returns a dict of named loss terms, already
            weighted; the loop back-propagates their sum.
        trainable: the parameters the optimizer updates; its state is what a resumed run
            restores (a student together with its adapter, say).
        export: the deployable part, saved under ``model`` with its ``arch`` (for a
            distillation job, the plain student without the adapter).
        evaluate: runs the validation on every process and returns metrics.
        best_metric: the metric (higher is better) that decides ``best.pt``.
        pictures: optional; an H x W x 3 picture of predictions logged after evaluations.
        before_step: optional; called with the iteration number (from 1) before each step,
            a resumed run's included (a schedule of loss weights, say).
    """

    module: nn.Module
    trainable: nn.Module
    export: nn.Module
    evaluate: Callable[[], dict[str, Any]]
    best_metric: str = "miou"
    pictures: Callable[[], np.ndarray | None] | None = None
    before_step: Callable[[int], None] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: bilinear upsampling has no deterministic CUDA backward; on the CPU
        # every op kaseg uses is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) RNG states as tensors and plain data, so that a
    checkpoint holding them reads with ``torch.load(weights_only=True)``."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["bit_generator"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(parameters: list[nn.Parameter], config: Config) -> torch.optim.Optimizer:
    train = config.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)


def resolve_resume(config: Config) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (see ``train.resume``)."""
    last = config.run_dir / "checkpoints" / "last.pt"
    resume = config.train.resume
    if resume is None:
        if last.exists():
            raise FileExistsError(
                f"run folder {str(config.run_dir)!r} already holds {last.name}; continue it with "
                "--resume (train.resume=auto) or choose another name / output_dir"
            )
        return None
    if resume == "auto":
        return last if last.exists() else None
    return Path(resume)


class _Averager:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {key: total / max(self.count, 1) for key, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


@dataclass
class _Loop:
    """What :func:`fit` trains with, and how far it has got."""

    module: nn.Module  # job.module on the device
    forward: nn.Module | Callable  # module, wrapped in DDP and/or compiled as configured
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: dict[str, Any]  # torch.autocast arguments
    start: int = 0  # the last finished iteration (0: a fresh run)
    best: float = -math.inf  # the best job.best_metric so far
    metrics: dict[str, Any] | None = None  # of the last evaluation


def fit(
    job: TrainingJob,
    config: Config,
    *,
    train_dataset: torch.utils.data.Dataset,
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``job`` for ``config.train.iterations``; returns the final evaluation metrics.

    The steps follow the lifecycle in the module docstring.
    """
    train = config.train
    main = is_main_process()
    resume_from = resolve_resume(config)
    loop = _prepare(job, config, device)
    saved_metrics = None
    if resume_from is not None:
        saved_metrics = _restore(loop, job, resume_from, config)
        if main:
            logger.info("resumed from %s at iteration %d", resume_from, loop.start)
    loop.forward = _wrap(loop.module, config, device)

    batches = iter(train_loader(
        train_dataset,
        batch_size=config.data.batch_size,
        seed=config.seed,
        start_iteration=loop.start,
        workers=config.data.workers,
        rank=rank(),
        world_size=world_size(),
        pin_memory=device.type == "cuda",
    ))
    progress_log = _ProgressLog(config, initial=loop.start, show=progress and main)
    loop.module.train()
    for iteration in range(loop.start + 1, train.iterations + 1):
        images, masks = next(batches)
        if job.before_step is not None:
            job.before_step(iteration)
        values = _train_step(loop, images, masks, iteration, config, device)
        progress_log.add(values)
        if iteration % train.log_every == 0 or iteration == train.iterations:
            progress_log.log(iteration, lr=loop.optimizer.param_groups[0]["lr"])
        if iteration == train.iterations or (train.eval_every > 0 and iteration % train.eval_every == 0):
            _evaluate_and_keep_best(loop, job, config, iteration, progress_log)
        if main and (iteration % train.checkpoint_every == 0 or iteration == train.iterations):
            _save(loop, job, config, "last.pt", iteration)
    progress_log.close()
    # A resumed run that had already finished trains nothing and returns its saved metrics.
    return loop.metrics if loop.metrics is not None else (saved_metrics or {})


def _prepare(job: TrainingJob, config: Config, device: torch.device) -> _Loop:
    """Step 1: the job's modules on the device; optimizer, poly schedule and AMP scaler."""
    train = config.train
    module = job.module.to(device)
    if train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if train.sync_bn and world_size() > 1:
        convert_sync_batchnorm(job.trainable, device)
    parameters = [p for p in job.trainable.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, config)
    scheduler = poly_lr(
        optimizer,
        train.iterations,
        power=train.poly_power,
        warmup_iterations=train.warmup_iterations,
        warmup_factor=train.warmup_factor,
    )
    use_cuda_amp = device.type == "cuda" and train.amp != "off"
    # bf16 autocast also runs on CPUs (fast where they have bf16 instructions, e.g. AVX512-BF16);
    # fp16 autocast is for GPUs only, with its gradient scaler.
    use_amp = use_cuda_amp or train.amp == "bf16"
    return _Loop(
        module=module,
        forward=module,
        parameters=parameters,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=use_cuda_amp and train.amp == "fp16"),
        autocast=dict(
            device_type=device.type,
            dtype=torch.float16 if train.amp == "fp16" else torch.bfloat16,
            enabled=use_amp,
        ),
    )


# The settings a resumed run must share with the run it continues: with another value the
# result would be neither run (the learning-rate schedule, say, would jump).
RESUME_KEYS = (
    ("seed",), ("train", "iterations"), ("train", "lr"), ("train", "warmup_iterations"),
    ("train", "optimizer"), ("data", "batch_size"),
)


def _restore(loop: _Loop, job: TrainingJob, path: Path, config: Config) -> dict[str, Any] | None:
    """Step 2: weights, optimizer, scheduler, scaler, RNG states and the iteration of ``path``;
    returns the metrics saved with it."""
    state = load_checkpoint(path)
    missing = [key for key in ("optimizer", "scheduler", "scaler", "rng", "iteration") if key not in state]
    if missing:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: it holds weights but no training state ({', '.join(missing)}); "
            "resume from the last.pt of a kaseg run"
        )
    if isinstance(state.get("config"), dict):
        _check_same_schedule(state["config"], to_dict(config), path)
    check_arch(state["arch"], job.export.arch, path)
    job.trainable.load_state_dict(state.get("trainable", state["model"]))
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    loop.start, loop.best = state["iteration"], state["best"]
    return state.get("metrics")


def _check_same_schedule(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    def value(tree: dict[str, Any], keys: tuple[str, ...]) -> Any:
        for key in keys:
            tree = tree.get(key, {}) if isinstance(tree, dict) else {}
        return tree

    changed = [
        f"{'.'.join(keys)} {value(saved, keys)!r} -> {value(current, keys)!r}"
        for keys in RESUME_KEYS
        if value(saved, keys) != value(current, keys)
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: the config changed since that run ({'; '.join(changed)}); "
            "resume with the run's own settings, or start a new run (another name or output_dir)"
        )


def _wrap(module: nn.Module, config: Config, device: torch.device) -> nn.Module | Callable:
    """DistributedDataParallel over several processes, then torch.compile when configured."""
    forward = module
    if world_size() > 1:
        forward = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if config.train.compile:
        forward = torch.compile(forward)
    return forward


def _train_step(
    loop: _Loop, images: torch.Tensor, masks: torch.Tensor, iteration: int, config: Config, device: torch.device
) -> dict[str, float]:
    """Step 3: one optimizer step on the sum of the job's loss terms; returns their values.

    A non-finite term raises before any weight changes.
    """
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    if config.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(**loop.autocast):
        losses = loop.forward(images, masks)
    total = sum(losses.values())
    values = {name: float(value.detach()) for name, value in losses.items()}
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss at iteration {iteration}: {', '.join(bad)}; weights and checkpoints "
            f"were left as they were (last good: {config.run_dir / 'checkpoints' / 'last.pt'})"
        )
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(total).backward()
    if config.train.grad_clip is not None:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(loop.parameters, config.train.grad_clip)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.scheduler.step()
    return {"loss": float(total.detach()), **values}


class _ProgressLog:
    """Step 4's outputs: the progress bar, metrics.jsonl and TensorBoard (rank 0 writes)."""

    def __init__(self, config: Config, *, initial: int, show: bool) -> None:
        self.name = config.name
        self.run_log = RunLogger(config.run_dir, enabled=is_main_process())
        self.bar = tqdm(
            total=config.train.iterations, initial=initial, desc=config.name, disable=not show, dynamic_ncols=True
        )
        self.averager = _Averager()
        self.tick = time.perf_counter()

    def add(self, values: dict[str, float]) -> None:
        self.averager.add(values)
        self.bar.update(1)

    def log(self, iteration: int, *, lr: float) -> None:
        """The mean of each term since the last call, the learning rate and iterations per second."""
        elapsed = time.perf_counter() - self.tick
        logged = self.averager.count
        means = self.averager.pop()
        means.update(lr=lr, it_per_s=logged / max(elapsed, 1e-9))
        self.tick = time.perf_counter()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k != "it_per_s"})
        self.run_log.log(iteration, "train", means)

    def log_evaluation(self, iteration: int, metrics: dict[str, Any], picture: np.ndarray | None) -> None:
        if picture is not None:
            self.run_log.log_image(iteration, "val/predictions", picture)
        self.run_log.log(iteration, "val", metrics)
        if is_main_process():
            # stderr, like the bar: stdout stays clean for --json output.
            self.bar.write(f"[{self.name}] iteration {iteration}: " + _summary(metrics), file=sys.stderr)

    @property
    def draws_pictures(self) -> bool:
        return self.run_log.writer is not None

    def close(self) -> None:
        self.bar.close()
        self.run_log.close()


def _evaluate_and_keep_best(
    loop: _Loop, job: TrainingJob, config: Config, iteration: int, progress_log: _ProgressLog
) -> None:
    """Step 4: ``job.evaluate()`` on every process, logged; a new best score writes ``best.pt``."""
    loop.metrics = job.evaluate()
    picture = None
    if is_main_process() and job.pictures is not None and progress_log.draws_pictures:
        picture = job.pictures()
    loop.module.train()
    progress_log.log_evaluation(iteration, loop.metrics, picture)
    score = loop.metrics.get(job.best_metric)
    if score is not None and score > loop.best:
        loop.best = score
        if is_main_process():
            _save(loop, job, config, "best.pt", iteration)


def _save(loop: _Loop, job: TrainingJob, config: Config, name: str, iteration: int) -> None:
    """Step 5: the deployable model, the training state and the config, as tensors and plain
    data (readable with ``weights_only=True``), atomically to ``checkpoints/<name>``."""
    state = {
        "arch": job.export.arch,
        "model": job.export.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "iteration": iteration,
        "best": loop.best,
        "best_metric": job.best_metric,
        "metrics": loop.metrics or None,
        "rng": _rng_state(),
        "config": to_dict(config),
    }
    if job.trainable is not job.export:
        state["trainable"] = job.trainable.state_dict()
    save_checkpoint(state, config.run_dir / "checkpoints" / name)


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{key} {value:.2f}" for key, value in metrics.items() if isinstance(value, (int, float))
    )
