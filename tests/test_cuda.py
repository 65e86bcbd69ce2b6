"""GPU checks, skipped where no CUDA device is present (CI has none). They run on a lent
GPU machine with ``python -m pytest tests/test_cuda.py`` (README, "GPU")."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import run_kaseg, tiny_config, write_config

from kaseg.distill.functional import affinity_loss, knowledge_adaptation_loss
from kaseg.distill.relational import cross_image_relation_loss, dist_loss, intra_class_variation_loss
from kaseg.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _losses(student, teacher, logits_s, logits_t, masks):
    return {
        "adapt": knowledge_adaptation_loss(student, teacher),
        "affinity": affinity_loss(student, teacher),
        "cirkd": cross_image_relation_loss(student, teacher, block_rows=7),
        "dist": dist_loss(logits_s, logits_t, masks),
        "ifvd": intra_class_variation_loss(student, teacher, masks, num_classes=5),
    }


def test_every_loss_on_the_gpu_equals_the_cpu_in_value_and_gradient():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 16, 9, 9, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 16, 9, 9, generator=generator, dtype=torch.float64)
    logits_s = torch.randn(3, 5, 9, 9, generator=generator, dtype=torch.float64)
    logits_t = torch.randn(3, 5, 9, 9, generator=generator, dtype=torch.float64)
    masks = torch.randint(0, 5, (3, 9, 9), generator=generator)
    masks[0, :2] = 255
    results = {}
    for device in ("cpu", "cuda"):
        inputs = [t.to(device).requires_grad_(t.is_floating_point()) for t in (student, teacher, logits_s, logits_t)]
        values = _losses(*inputs, masks.to(device))
        results[device] = {}
        for name, value in values.items():
            grads = torch.autograd.grad(value, [inputs[0], inputs[2]], allow_unused=True)
            results[device][name] = (value.cpu(), [g.cpu() if g is not None else None for g in grads])
    for name, (value, grads) in results["cpu"].items():
        gpu_value, gpu_grads = results["cuda"][name]
        torch.testing.assert_close(gpu_value, value, msg=name)
        for grad, gpu_grad in zip(grads, gpu_grads):
            assert (grad is None) == (gpu_grad is None), name
            if grad is not None:
                torch.testing.assert_close(gpu_grad, grad, msg=name)


def test_training_on_the_gpu_with_bf16_autocast(tmp_path):
    config = tiny_config(tmp_path, "bf16", train={"device": "cuda", "amp": "bf16", "channels_last": True,
                                                  "deterministic": False})
    run_kaseg("train", "--config", str(write_config(tmp_path / "bf16.yaml", config)))
    state = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "last.pt")
    assert state["iteration"] == config["train"]["iterations"]
    assert 0.0 <= state["metrics"]["miou"] <= 100.0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nccl_process_group_all_reduce_and_a_ddp_step():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kaseg.engine.distributed import all_reduce_sum

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        value = torch.tensor([2.0, 3.0], device="cuda")
        assert torch.equal(all_reduce_sum(value), torch.tensor([2.0, 3.0], device="cuda"))
        model = DistributedDataParallel(torch.nn.Linear(4, 2).cuda(), device_ids=[0])
        model(torch.randn(8, 4, device="cuda")).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()
