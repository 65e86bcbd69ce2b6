"""torch.distributed set-up for runs launched with torchrun (NCCL on GPUs, gloo on CPUs).

One process or many: the same code path, with rank 0 doing all writing. torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm


def init_distributed(device_type: str) -> None:
    """Joins the process group torchrun describes; a no-op in a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_device(device: str) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all processes in place (no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


class _DifferentiableSum(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm of ``x`` with statistics over the batches of all processes.

    The per-channel sum, sum of squares and count are reduced with a differentiable
    all-reduce (float64, so E[x^2] - E[x]^2 does not cancel badly); gradients flow to
    every process's inputs exactly as in one process holding the whole batch.
    """
    channels = x.shape[1]
    x64 = x.double()
    count = torch.tensor([x.numel() / channels], dtype=torch.float64, device=x.device)
    stats = _DifferentiableSum.apply(torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), count]))
    total = stats[-1]
    mean = stats[:channels] / total
    var = stats[channels : 2 * channels] / total - mean * mean
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * total / (total - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    shape = (1, channels, 1, 1)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + bn.eps).to(x.dtype).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


def _synchronised(bn: nn.Module) -> bool:
    return bn.training and is_distributed()


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch on any device (torch's SyncBatchNorm is GPU-only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_batch_norm(self, x) if _synchronised(self) else super().forward(x)


class AllReduceBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d (norm, dropout, activation) over the global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _synchronised(self):
            return super().forward(x)
        return self.act(self.drop(_global_batch_norm(self, x)))


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Makes every batch norm layer normalise over the batches of all processes."""
    if device.type == "cuda":
        return timm_convert_sync_batchnorm(module)
    for layer in module.modules():
        # The replacements only override forward, so swapping the class keeps every
        # parameter, buffer and submodule (timm's activation included) as it is.
        if type(layer) is nn.BatchNorm2d:
            layer.__class__ = AllReduceBatchNorm2d
        elif type(layer) is BatchNormAct2d:
            layer.__class__ = AllReduceBatchNormAct2d
    return module
