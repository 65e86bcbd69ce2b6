"""The one training loop of kaseg, shared by every stage.

Lifecycle of :func:`fit`:

1. move the job's modules to the device (channels_last, SyncBatchNorm, DDP, compile as
   configured) and build the optimizer, the poly schedule and the AMP grad scaler;
2. when resuming, restore the trainable weights, optimizer, scheduler, scaler, RNG
   states and the iteration (which fixes the data position, see ``kaseg.data.loader``);
3. each iteration: ``losses = job.module(images, masks)`` (a dict of named, already
   weighted loss terms), their sum is back-propagated; a non-finite term stops the run
   before any weight or checkpoint changes;
4. every ``log_every`` iterations: progress bar, metrics.jsonl, TensorBoard; every
   ``eval_every`` and at the end: ``job.evaluate()``, keeping ``best.pt``; every
   ``checkpoint_every`` and at the end: ``last.pt``.

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
from kaseg.engine.checkpoint import check_arch, load_checkpoint, save_checkpoint
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
    """

    module: nn.Module
    trainable: nn.Module
    export: nn.Module
    evaluate: Callable[[], dict[str, Any]]
    best_metric: str = "miou"
    pictures: Callable[[], np.ndarray | None] | None = None


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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def fit(
    job: TrainingJob,
    config: Config,
    *,
    train_dataset: torch.utils.data.Dataset,
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``job`` for ``config.train.iterations``; returns the final evaluation metrics."""
    train = config.train
    run_dir = config.run_dir
    checkpoints = run_dir / "checkpoints"
    main = is_main_process()
    resume_from = resolve_resume(config)

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
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp and train.amp == "fp16")
    amp_dtype = torch.float16 if train.amp == "fp16" else torch.bfloat16

    start, best = 0, -math.inf
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_arch(state["arch"], job.export.arch, resume_from)
        job.trainable.load_state_dict(state.get("trainable", state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start, best = state["iteration"], state["best"]
        if main:
            logger.info("resumed from %s at iteration %d", resume_from, start)

    forward = module
    if world_size() > 1:
        forward = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    if train.compile:
        forward = torch.compile(forward)

    def save(path: Path, iteration: int, metrics: dict[str, Any] | None) -> None:
        state = {
            "arch": job.export.arch,
            "model": job.export.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
            "best": best,
            "best_metric": job.best_metric,
            "metrics": metrics,
            "rng": _rng_state(),
            "config": to_dict(config),
        }
        if job.trainable is not job.export:
            state["trainable"] = job.trainable.state_dict()
        save_checkpoint(state, path)

    run_log = RunLogger(run_dir, enabled=main)
    loader = train_loader(
        train_dataset,
        batch_size=config.data.batch_size,
        seed=config.seed,
        start_iteration=start,
        workers=config.data.workers,
        rank=rank(),
        world_size=world_size(),
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    averager = _Averager()
    bar = tqdm(
        total=train.iterations, initial=start, desc=config.name, disable=not (progress and main),
        dynamic_ncols=True,
    )
    metrics: dict[str, Any] = {}
    tick = time.perf_counter()
    module.train()
    for iteration in range(start + 1, train.iterations + 1):
        images, masks = next(batches)
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        if train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_cuda_amp):
            losses = forward(images, masks)
        total = sum(losses.values())
        values = {name: float(value.detach()) for name, value in losses.items()}
        bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {iteration}: {', '.join(bad)}; weights and "
                f"checkpoints were left as they were (last good: {checkpoints / 'last.pt'})"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if train.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        averager.add({"loss": float(total.detach()), **values})
        bar.update(1)

        if iteration % train.log_every == 0 or iteration == train.iterations:
            elapsed = time.perf_counter() - tick
            logged = averager.count
            means = averager.pop()
            means.update(lr=optimizer.param_groups[0]["lr"], it_per_s=logged / max(elapsed, 1e-9))
            tick = time.perf_counter()
            bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k != "it_per_s"})
            run_log.log(iteration, "train", means)

        evaluate_now = iteration == train.iterations or (
            train.eval_every > 0 and iteration % train.eval_every == 0
        )
        if evaluate_now:
            metrics = job.evaluate()
            if main and job.pictures is not None and run_log.writer is not None:
                picture = job.pictures()
                if picture is not None:
                    run_log.log_image(iteration, "val/predictions", picture)
            module.train()
            score = metrics.get(job.best_metric)
            run_log.log(iteration, "val", metrics)
            if main:
                # stderr, like the bar: stdout stays clean for --json output.
                bar.write(f"[{config.name}] iteration {iteration}: " + _summary(metrics), file=sys.stderr)
            if score is not None and score > best:
                best = score
                if main:
                    save(checkpoints / "best.pt", iteration, metrics)
        if main and (iteration % train.checkpoint_every == 0 or iteration == train.iterations):
            save(checkpoints / "last.pt", iteration, metrics or None)
    bar.close()
    run_log.close()
    if not metrics and start >= train.iterations and resume_from is not None:
        metrics = load_checkpoint(resume_from).get("metrics") or {}
    return metrics


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{key} {value:.2f}" for key, value in metrics.items() if isinstance(value, (int, float))
    )
