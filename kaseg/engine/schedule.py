"""Learning-rate schedules: DeepLab's poly decay with an optional linear warm-up."""

from __future__ import annotations

import torch


def poly_lr_factor(
    iteration: int,
    total_iterations: int,
    *,
    power: float = 0.9,
    warmup_iterations: int = 0,
    warmup_factor: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based).

    ``(1 - iteration / total) ** power``, times a linear ramp from ``warmup_factor`` to 1
    over the first ``warmup_iterations``.
    """
    if total_iterations <= 0:
        raise ValueError(f"total_iterations must be positive, got {total_iterations}")
    progress = min(iteration, total_iterations) / total_iterations
    factor = (1.0 - progress) ** power
    if iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        factor *= warmup_factor + (1.0 - warmup_factor) * alpha
    return factor


def poly_lr(
    optimizer: torch.optim.Optimizer,
    total_iterations: int,
    *,
    power: float = 0.9,
    warmup_iterations: int = 0,
    warmup_factor: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepping :func:`poly_lr_factor` once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: poly_lr_factor(
            it,
            total_iterations,
            power=power,
            warmup_iterations=warmup_iterations,
            warmup_factor=warmup_factor,
        ),
    )
