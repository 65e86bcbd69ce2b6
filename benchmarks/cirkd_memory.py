"""Time and peak memory of CIRKD's mini-batch loss: kaseg's blocked form vs the per-pair form.

Forward + backward at C channels for student and teacher on one grid, batch B (8), for
several grids (65 x 65 is the case the issue asks for). The per-pair form is CIRKD's
published loop (winycg/CIRKD, losses/cirkd_mini_batch.py): one N x N similarity matrix
per ordered pair of images, all of them kept by autograd until the backward pass. Each
measurement runs in a fresh subprocess so that its peak memory (on the CPU: the growth of
the max RSS over the first step, inputs excluded; on CUDA: max allocated) is its own; the
time is the median of the following steps. The per-pair form is skipped where its
matrices would not fit in the memory available.

    python benchmarks/cirkd_memory.py [--device cpu|cuda] [--batch 8] [--channels 256] [--repeats 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from _isolated import kib_field, ratios, result_cell, rss_bytes, run_isolated

GRIDS = [(33, 33), (65, 65)]
TEMPERATURE = 0.1


def per_pair_cirkd(student, teacher):
    """CIRKD's form: B^2 N x N matrices, KL 'batchmean' per pair, mean over the pairs."""
    import torch.nn.functional as F

    student = F.normalize(student, p=2, dim=1).flatten(2)  # B x C x N
    teacher = F.normalize(teacher, p=2, dim=1).flatten(2)
    batch = student.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            log_p_s = F.log_softmax(student[i].T @ student[j] / TEMPERATURE, dim=1)
            p_t = F.softmax(teacher[i].T @ teacher[j] / TEMPERATURE, dim=1)
            total = total + F.kl_div(log_p_s, p_t, reduction="batchmean")
    return total / batch**2


def measure(form: str, height: int, width: int, batch: int, channels: int, device: str, repeats: int) -> dict:
    """Runs in the child process: returns median time and peak memory of forward+backward."""
    import torch

    from kaseg.distill import cross_image_relation_loss

    def blocked(student, teacher):
        return cross_image_relation_loss(student, teacher, temperature=TEMPERATURE)

    torch.manual_seed(0)
    loss_fn = blocked if form == "blocked" else per_pair_cirkd
    student = torch.randn(batch, channels, height, width, device=device, requires_grad=True)
    teacher = torch.randn(batch, channels, height, width, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        student.grad = None
        loss_fn(student, teacher).backward()
        sync()

    # A tiny step first initialises the libraries, which would otherwise count as the loss's memory.
    tiny = torch.randn(2, channels, 4, 4, device=device, requires_grad=True)
    loss_fn(tiny, torch.randn(2, channels, 4, 4, device=device)).backward()
    sync()
    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    first_ms = (time.perf_counter() - start) * 1000

    def timed_step() -> float:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1000

    times = [timed_step() for _ in range(repeats)] or [first_ms]
    return {"time_ms": statistics.median(times), "peak_mb": max(peak, 0) / 2**20}


def run_child(form: str, grid: tuple[int, int], args: argparse.Namespace) -> dict:
    return run_isolated(__file__, [
        "--child", form, str(grid[0]), str(grid[1]), "--batch", str(args.batch),
        "--channels", str(args.channels), "--device", args.device, "--repeats", str(args.repeats),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the first (0: time the first)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("FORM", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        form, height, width = args.child
        result = measure(form, int(height), int(width), args.batch, args.channels, args.device, args.repeats)
        print(json.dumps(result))
        return

    rows = []
    for grid in GRIDS:
        positions = grid[0] * grid[1]
        row = {"grid": f"{grid[0]}x{grid[1]}", "batch": args.batch, "positions": positions, "channels": args.channels}
        row["blocked"] = run_child("blocked", grid, args)
        # Kept for the backward per pair: log p_s and p_t (N x N each), plus a few in flight.
        per_pair_bytes = (2 * args.batch**2 + 4) * positions**2 * 4
        available = kib_field("/proc/meminfo", "MemAvailable:") if args.device == "cpu" else float("inf")
        if per_pair_bytes > 0.8 * available:
            row["per_pair"] = {"skipped": f"needs about {per_pair_bytes / 2**30:.0f} GB"}
        else:
            row["per_pair"] = run_child("per_pair", grid, args)
        row.update(ratios(row["per_pair"], row["blocked"]))
        rows.append(row)
        if not args.json:
            print(_format_row(row), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


def _format_row(row: dict) -> str:
    gains = ""
    if "time_ratio" in row:
        gains = f"  per-pair/blocked: time {row['time_ratio']:5.2f}x, memory {row['memory_ratio']:7.1f}x"
    return (
        f"{row['grid']:>6s} x B={row['batch']} (N={row['positions']:5d})  blocked {result_cell(row['blocked'])}  "
        f"per-pair {result_cell(row['per_pair'])}{gains}"
    )


if __name__ == "__main__":
    main()
