"""Model cost: parameters, FLOPs (torch.utils.flop_counter), latency, and the machine's limit.

FLOP convention: torch's counter counts a multiply-add as 2 FLOPs (convolutions and
matrix products; element-wise ops, normalisation and interpolation are not counted).
kaseg reports both ``flops`` and ``macs = flops / 2``; papers such as MobileNetV2 quote
multiply-adds (MAdds = MACs).

The machine's limit is measured, not looked up: :func:`matmul_peak_gflops` times a large
fp32 matrix product on the same threads, and :func:`achieved_rate` states a path's
FLOPs per second as a fraction of it (roofline-style; a convolutional net with depthwise
layers is memory-bound in places and stays well below the peak).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

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

    def forward() -> None:
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = time_interleaved({"model": forward}, warmup=warmup, runs=runs, block=runs)["model"]
    return latency_stats(times)


def time_interleaved(
    runners: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    runs: int = 10,
    block: int = 5,
    pause_s: float = 0.05,
) -> dict[str, list[float]]:
    """Wall times (ms) of ``runs`` calls of each runner, the runners taking turns in blocks.

    On a shared machine the load changes over seconds. Timing path A fully and then path B
    would give B a different machine; taking turns (``block`` calls of A, ``block`` of B,
    then A again, ...) spreads the load over every path, so their ratios stay meaningful
    when the absolute numbers do not. Each block starts after a ``pause_s`` sleep and one
    untimed call, so threads another runtime left spinning (OpenMP, onnxruntime's pool)
    have gone to sleep and caches hold this path's weights.

    Args:
        runners: name -> a callable that runs one forward pass (and waits for it).
        warmup: untimed calls of each runner before any timing (compilation, allocation).
        runs: timed calls of each runner.
        block: timed calls per turn.
    """
    if runs < 1 or warmup < 0 or block < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, block >= 1; got {runs}, {warmup}, {block}")
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    while any(len(t) < runs for t in times.values()):
        for name, run in runners.items():
            todo = min(block, runs - len(times[name]))
            if todo == 0:
                continue
            time.sleep(pause_s)
            run()
            for _ in range(todo):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def latency_stats(times_ms: list[float]) -> dict[str, float]:
    """``{"latency_ms": median, "latency_p90_ms": 90th percentile}`` of wall times in ms."""
    return {"latency_ms": statistics.median(times_ms), "latency_p90_ms": _percentile(times_ms, 90)}


@torch.no_grad()
def matmul_peak_gflops(threads: int | None = None, *, size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 rate in GFLOP/s: the best of ``repeats`` ``size`` x ``size`` matrix products.

    A large square product is the most compute-bound kernel there is (``2 size^3`` FLOPs
    on ``3 size^2`` numbers), so its rate is the practical ceiling of fp32 arithmetic on
    ``threads`` threads (default: torch's current count) with this torch build's BLAS.
    The best run, not the median, estimates the ceiling: load from other processes only
    ever slows a run down.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be at least 1, got size={size}, repeats={repeats}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        torch.mm(a, b)  # warm-up: BLAS thread pool and packing buffers
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


def achieved_rate(flops: float, latency_ms: float, peak_gflops: float | None) -> dict[str, float | None]:
    """A path's ``gflops_per_s`` (``flops`` per pass over its latency) and ``peak_fraction`` of the peak.

    For an int8 path pass the fp32 model's FLOPs: the rate is then in equivalent fp32
    FLOPs (the same work, done in 8-bit arithmetic), compared with the fp32 peak.
    """
    rate = flops / (latency_ms / 1000) / 1e9 if latency_ms > 0 else float("nan")
    fraction = rate / peak_gflops if peak_gflops else None
    return {"gflops_per_s": rate, "peak_fraction": fraction}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
