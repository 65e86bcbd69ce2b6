"""Time and peak memory of the affinity loss: kaseg's Gram form vs the naive N x N form.

Forward + backward at 256 channels, batch 1, for several grids. Each measurement runs in
a fresh subprocess so that its peak memory (on the CPU: the growth of the max RSS over the
first step, inputs excluded; on CUDA: max allocated) is its own; the time is the median
of the following steps. The naive form is skipped where its N x N matrices would not fit in memory.

    python benchmarks/affinity.py [--device cpu|cuda] [--channels 256] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from _isolated import ratios, result_cell, rss_bytes, run_isolated

GRIDS = [(33, 33), (65, 65), (64, 128), (128, 256)]
NAIVE_MEMORY_LIMIT_GB = 12.0


def naive_affinity(student, teacher):
    """The textbook form: both N x N affinity matrices, in float32."""
    import torch.nn.functional as F

    s = F.normalize(student.flatten(2), dim=1)
    t = F.normalize(teacher.flatten(2), dim=1)
    n = s.shape[2]
    a_s = s.transpose(1, 2) @ s / n
    a_t = t.transpose(1, 2) @ t / n
    return (a_s - a_t).pow(2).sum((1, 2)).mean()


def measure(form: str, height: int, width: int, channels: int, device: str, repeats: int) -> dict:
    """Runs in the child process: returns median time and peak memory of forward+backward."""
    import torch

    from kaseg.distill import affinity_loss

    torch.manual_seed(0)
    loss_fn = affinity_loss if form == "gram" else naive_affinity
    student = torch.randn(1, channels, height, width, device=device, requires_grad=True)
    teacher = torch.randn(1, channels, height, width, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        student.grad = None
        loss_fn(student, teacher).backward()
        sync()

    # Peak memory of the first full-size step, measured from the RSS just before it. A
    # tiny step first initialises the libraries (BLAS buffers, autograd), which would
    # otherwise be counted as the loss's memory.
    tiny = torch.randn(1, channels, 4, 4, device=device, requires_grad=True)
    loss_fn(tiny, torch.randn(1, channels, 4, 4, device=device)).backward()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return {"time_ms": statistics.median(times), "peak_mb": max(peak, 0) / 2**20}


def run_child(form: str, grid: tuple[int, int], args: argparse.Namespace) -> dict:
    return run_isolated(__file__, [
        "--child", form, str(grid[0]), str(grid[1]),
        "--channels", str(args.channels), "--device", args.device, "--repeats", str(args.repeats),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("FORM", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        form, height, width = args.child
        print(json.dumps(measure(form, int(height), int(width), args.channels, args.device, args.repeats)))
        return

    rows = []
    for grid in GRIDS:
        positions = grid[0] * grid[1]
        row = {"grid": f"{grid[0]}x{grid[1]}", "positions": positions, "channels": args.channels}
        row["gram"] = run_child("gram", grid, args)
        # A_s, A_t, their difference and its gradient: four N x N float32 matrices.
        naive_gb = 4 * positions**2 * 4 / 2**30
        if naive_gb > NAIVE_MEMORY_LIMIT_GB:
            row["naive"] = {"skipped": f"needs about {naive_gb:.0f} GB for its N x N matrices"}
        else:
            row["naive"] = run_child("naive", grid, args)
        row.update(ratios(row["naive"], row["gram"]))
        rows.append(row)
        if not args.json:
            print(_format_row(row), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


def _format_row(row: dict) -> str:
    gains = ""
    if "time_ratio" in row:
        gains = f"  {row['time_ratio']:6.1f}x faster, {row['memory_ratio']:7.1f}x less memory"
    return (f"{row['grid']:>8s} (N={row['positions']:6d})  gram {result_cell(row['gram'])}  "
            f"naive {result_cell(row['naive'])}{gains}")


if __name__ == "__main__":
    main()
