"""Where the time of one distillation step goes.

For each setting, times (median over repeats):

* ``teacher_forward``: the frozen teacher under inference mode;
* ``encoder``: the frozen auto-encoder's encoder on the teacher features;
* ``student_step``: student forward + cross-entropy + backward + optimizer step, alone;
* ``distill_step``: the whole ``Distiller`` step (teacher, encoder, student, adapter, all
  losses, backward, optimizer step), as the training loop runs it;

and reports ``overhead = distill_step - teacher_forward - student_step``: what the adapter,
encoder and losses add, as a fraction of the step (the target is at most 15%). Also a
forward-only breakdown of the adapter and the two losses.

    python benchmarks/distill_step.py [--device cpu|cuda] [--repeats 3] [--json] [--setting demo|voc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kaseg.distill import (
    Distiller,
    FeatureDims,
    TeacherAutoEncoder,
    affinity_loss,
    build_losses,
    knowledge_adaptation_loss,
    stride_ratio_layers,
)
from kaseg.models import build_model

SETTINGS = {
    # The demo: kaseg/configs/shapes (64x64, batch 16).
    "demo": dict(
        size=64, batch=16, num_classes=8, code_channels=64,
        teacher=dict(
            name="deeplabv3plus_resnet18", output_stride=8, decoder_stride=8, aspp_rates=(2, 4, 6), head_channels=64
        ),
        student=dict(name="deeplabv3_mobilenetv2", output_stride=16, width=0.5, aspp=False, head_channels=64),
    ),
    # Pascal VOC size: the paper's ResNet-50 teacher at OS 8, MobileNetV2 student at OS 16.
    "voc": dict(
        size=513, batch=2, num_classes=21, code_channels=128,
        teacher=dict(name="deeplabv3plus_resnet50", output_stride=8, decoder_stride=8),
        student=dict(name="deeplabv3_mobilenetv2", output_stride=16),
    ),
}


def timed(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``function`` after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    function()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_setting(name: str, device: torch.device, repeats: int) -> dict:
    setting = SETTINGS[name]
    torch.manual_seed(0)
    k = setting["num_classes"]
    build = lambda spec: build_model(**spec, num_classes=k).to(device)  # noqa: E731
    teacher, student = build(setting["teacher"]), build(setting["student"])
    layers = stride_ratio_layers(teacher.feature_stride, student.feature_stride)
    code_channels = setting["code_channels"]
    encoder = TeacherAutoEncoder(teacher.feature_channels, code_channels, downsample_layers=layers).to(device)
    dims = FeatureDims(student.feature_channels, teacher.feature_channels, setting["code_channels"], k)
    losses = build_losses([{"name": "adapt", "weight": 50.0}, {"name": "affinity", "weight": 1.0}], dims)
    distiller = Distiller(teacher, student, encoder=encoder, losses=losses).to(device).train()
    optimizer = torch.optim.SGD(distiller.trainable.parameters(), lr=1e-3, momentum=0.9)

    images = torch.randn(setting["batch"], 3, setting["size"], setting["size"], device=device)
    masks = torch.randint(0, k, (setting["batch"], setting["size"], setting["size"]), device=device)

    with torch.inference_mode():
        teacher_features = teacher(images)["features"]
    student_features = student(images)["features"].detach()
    grid = student_features.shape[-2:]

    def teacher_forward() -> None:
        with torch.inference_mode():
            teacher(images)

    def encode() -> None:
        with torch.inference_mode():
            encoder.encode(teacher_features)

    def student_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(student(images)["logits"], masks).backward()
        optimizer.step()

    def distill_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(distiller(images, masks).values()).backward()
        optimizer.step()

    with torch.inference_mode():
        code = encoder.encode(teacher_features)
    adapted = distiller.adapter(student_features).detach()

    def adapter_forward() -> None:
        distiller.adapter(student_features)

    result = {
        "setting": name,
        "device": str(device),
        "input": f"{setting['batch']}x3x{setting['size']}x{setting['size']}",
        "teacher_forward_ms": timed(teacher_forward, device, repeats),
        "encoder_ms": timed(encode, device, repeats),
        "student_step_ms": timed(student_step, device, repeats),
        "distill_step_ms": timed(distill_step, device, repeats),
        "adapter_forward_ms": timed(adapter_forward, device, repeats),
        "adapt_loss_ms": timed(lambda: knowledge_adaptation_loss(adapted, code), device, repeats),
        "affinity_loss_ms": timed(lambda: affinity_loss(adapted, code), device, repeats),
        "code_grid": list(grid),
    }
    overhead = result["distill_step_ms"] - result["teacher_forward_ms"] - result["student_step_ms"]
    result["overhead_ms"] = overhead
    result["overhead_fraction"] = overhead / result["distill_step_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setting", choices=sorted(SETTINGS), action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = [profile_setting(name, device, args.repeats) for name in args.setting or ["demo", "voc"]]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['setting']} ({r['input']}, {r['device']}, code grid {r['code_grid']}):")
        for key in ("teacher_forward_ms", "encoder_ms", "adapter_forward_ms", "adapt_loss_ms",
                    "affinity_loss_ms", "student_step_ms", "distill_step_ms", "overhead_ms"):
            print(f"  {key:20s} {r[key]:10.1f}")
        print(f"  overhead fraction    {100 * r['overhead_fraction']:9.1f} %")


if __name__ == "__main__":
    main()
