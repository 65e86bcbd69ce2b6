"""Model cost: parameters, FLOPs (torch.utils.flop_counter) and latency.

FLOP convention: torch's counter counts a multiply-add as 2 FLOPs (convolutions and
matrix products; element-wise ops, normalisation and interpolation are not counted).
kaseg reports both ``flops`` and ``macs = flops / 2``; papers such as MobileNetV2 quote
multiply-adds (MAdds = MACs).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs (multiply-add = 2) of one forward pass of a ``batch`` x 3 x H x W input."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, 3, *size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def model_profile(model: nn.Module, size: tuple[int, int]) -> dict[str, Any]:
    """Parameters, FLOPs, MACs, output stride and feature-map shape at ``size``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = model(torch.zeros(1, 3, *size, device=device))["features"]
    model.train(was_training)
    flops = count_flops(model, size)
    return {
        "params": count_parameters(model),
        "flops": flops,
        "macs": flops // 2,
        "gflops": flops / 1e9,
        "output_stride": getattr(model, "output_stride", None),
        "feature_stride": getattr(model, "feature_stride", None),
        "feature_shape": list(features.shape[1:]),
        "input_size": list(size),
    }


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    size: tuple[int, int],
    *,
    batch: int = 1,
    warmup: int = 3,
    runs: int = 10,
) -> dict[str, float]:
    """Median and 90th-percentile wall time of a forward pass, in milliseconds.

    CUDA work is synchronised before each clock read, so the numbers are real latencies.
    """
    device = next(model.parameters()).device
    model.eval()
    images = torch.randn(batch, 3, *size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        model(images)
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(images)
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return {"latency_ms": statistics.median(times), "latency_p90_ms": _percentile(times, 90)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
