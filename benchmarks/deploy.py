"""Deployment speed of a student on every inference path, against the machine's own limit.

Prints one table (paths x median / p90 latency, GFLOP/s, fraction of the fp32 matmul
peak, speed-ups) for one model at one size and thread count, the paths timed in turns so
that a shared machine's load falls on all of them alike, and checks issue 13's targets:

* onnxruntime fp32 at least 2.5x faster than eager contiguous PyTorch;
* onnxruntime int8 at least 1.3x faster than onnxruntime fp32;
* the fastest path at most 40 ms per image (the light-head student at 512 x 512 on 2 cores).

With ``--sweep`` it also times the int8 recipes (per-channel or not, QDQ or QOperator,
uint8 or int8 activations, reduce_range, parts kept in fp32) against onnxruntime fp32 in
the same turns, and, with ``--checkpoint``, scores each one's accuracy: argmax agreement
with PyTorch on held-out training images and mIoU on the validation split of the
checkpoint's data set (the calibration methods are compared there too).

    python benchmarks/deploy.py                    # light-head MobileNetV2 student, 512 x 512, 2 threads
    python benchmarks/deploy.py --compile          # also torch.compile (minutes of compilation)
    python benchmarks/deploy.py --sweep --checkpoint runs/shapes-student/checkpoints/best.pt
    python benchmarks/deploy.py --json

int8 speed does not depend on the calibration ranges, so the main table calibrates on
random inputs; the accuracy of the int8 model comes from ``kaseg export --int8`` +
``kaseg eval --onnx`` (or ``--sweep --checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

STUDENT = "deeplabv3_mobilenetv2:output_stride=16,aspp=false,width=1.0,num_classes=21"
TARGETS = {"onnx_over_eager": 2.5, "int8_over_onnx": 1.3, "fastest_ms": 40.0}

# (label, Int8Options keyword arguments); the first is kaseg's recipe (the defaults).
RECIPES = [
    ("QDQ per-channel u8s8, fp32 first conv + final resize (kaseg)", {}),
    ("QDQ per-channel u8s8, all int8", {"keep_fp32": ()}),
    ("QDQ per-tensor u8s8, all int8", {"per_channel": False, "keep_fp32": ()}),
    ("QOperator per-channel u8s8, all int8", {"quant_format": "qoperator", "keep_fp32": ()}),
    ("QDQ per-channel s8s8, all int8", {"activation_type": "int8", "keep_fp32": ()}),
    ("QDQ per-channel u8s8 reduce_range, all int8", {"reduce_range": True, "keep_fp32": ()}),
    ("QDQ per-channel u8s8, fp32 first conv", {"keep_fp32": ("first_conv",)}),
    ("QDQ per-channel u8s8, fp32 final resize", {"keep_fp32": ("final_resize",)}),
]
METHODS = ["minmax", "entropy", "percentile"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=STUDENT, help="zoo spec or checkpoint (default: the light-head student)")
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed passes per path")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--sweep", action="store_true", help="also time (and score) the int8 recipes")
    parser.add_argument("--checkpoint", help="a trained checkpoint to score the int8 recipes on its data set")
    parser.add_argument("--calibration", type=int, default=200, help="calibration images for --checkpoint")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from kaseg.tools.bench import bench

    (row,) = bench(
        [args.model], size=tuple(args.size), onnx=True, int8=True, compile=args.compile,
        runs=args.runs, threads=args.threads,
    )
    result: dict[str, Any] = {"bench": row, "targets": check_targets(row)}
    if args.sweep:
        result["sweep_speed"] = sweep_speed(args.model, tuple(args.size), args.threads, args.runs)
        if args.checkpoint:
            result["sweep_accuracy"] = sweep_accuracy(args.checkpoint, args.calibration)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_report(result)


def check_targets(row: dict[str, Any]) -> dict[str, Any]:
    paths = row["paths"]
    onnx_over_eager = paths["eager"]["latency_ms"] / paths["onnx"]["latency_ms"]
    int8_over_onnx = paths["onnx"]["latency_ms"] / paths["int8"]["latency_ms"]
    fastest = min(paths, key=lambda p: paths[p]["latency_ms"])
    return {
        "onnx_over_eager": onnx_over_eager,
        "int8_over_onnx": int8_over_onnx,
        "fastest_path": fastest,
        "fastest_ms": paths[fastest]["latency_ms"],
        "met": {
            "onnx_over_eager": onnx_over_eager >= TARGETS["onnx_over_eager"],
            "int8_over_onnx": int8_over_onnx >= TARGETS["int8_over_onnx"],
            "fastest_ms": paths[fastest]["latency_ms"] <= TARGETS["fastest_ms"],
        },
    }


def sweep_speed(model_spec: str, size: tuple[int, int], threads: int, runs: int) -> list[dict[str, Any]]:
    """Median latency of onnxruntime fp32 and of every int8 recipe, timed in turns."""
    from kaseg.tools.bench import load_any_model, parse_model_spec, torch_threads
    from kaseg.tools.export import INPUT_NAME, onnx_session, write_onnx
    from kaseg.tools.profile import latency_stats, time_interleaved
    from kaseg.tools.quantize import Int8Options, quantize_onnx

    name, kwargs = parse_model_spec(model_spec)
    model = load_any_model(name, kwargs)
    images = torch.randn(1, 3, *size)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(1, 3, *size, generator=generator) for _ in range(4)]
    feeds = {INPUT_NAME: images.numpy()}
    runners = {}
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="kaseg-deploy-") as folder:
        fp32 = write_onnx(model, Path(folder) / "fp32.onnx", images)
        files = {"onnxruntime fp32": fp32}
        for index, (label, options) in enumerate(RECIPES):
            files[label] = quantize_onnx(fp32, Path(folder) / f"int8-{index}.onnx", calibration,
                                         options=Int8Options(**options))
        for label, path in files.items():
            session = onnx_session(path, threads=threads)
            runners[label] = lambda session=session: session.run(None, feeds)
        times = time_interleaved(runners, runs=runs)
    base = latency_stats(times["onnxruntime fp32"])["latency_ms"]
    return [
        {"recipe": label, **latency_stats(values), "over_fp32": base / latency_stats(values)["latency_ms"]}
        for label, values in times.items()
    ]


def sweep_accuracy(checkpoint: str, calibration: int) -> list[dict[str, Any]]:
    """Argmax agreement with PyTorch (held-out training images) and validation mIoU of
    eager fp32, onnxruntime fp32 and each int8 recipe and calibration method, at the
    checkpoint's data size (a dynamic export)."""
    from kaseg.config import Config, from_dict
    from kaseg.engine.checkpoint import load_checkpoint
    from kaseg.stages import SegmentationEvaluator, load_segmenter
    from kaseg.tools.export import OnnxLogits, write_onnx
    from kaseg.tools.quantize import Int8Options, calibration_images, compare_logits, quantize_onnx

    config = from_dict(Config, load_checkpoint(checkpoint)["config"])
    model = load_segmenter(checkpoint)
    evaluator = SegmentationEvaluator(config, torch.device("cpu"))
    images, check = calibration_images(config.data, calibration, extra=16)

    def torch_logits(x: torch.Tensor) -> torch.Tensor:
        return model(x)["logits"]

    variants: list[tuple[str, dict[str, Any]]] = [("eager fp32", {}), ("onnxruntime fp32", {})]
    variants += RECIPES
    variants += [(f"kaseg recipe, {method} calibration", {"method": method}) for method in METHODS[1:]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kaseg-deploy-") as folder, torch.inference_mode():
        fp32 = write_onnx(model, Path(folder) / "fp32.onnx", images[0], dynamic=True)
        for index, (label, options) in enumerate(variants):
            if label == "eager fp32":
                logits_fn = torch_logits
            elif label == "onnxruntime fp32":
                logits_fn = OnnxLogits(fp32)
            else:
                path = quantize_onnx(fp32, Path(folder) / f"int8-{index}.onnx", images, options=Int8Options(**options))
                logits_fn = OnnxLogits(path)
            agreement = compare_logits(torch_logits, logits_fn, check)
            metrics = evaluator.evaluate(logits_fn)
            rows.append({"variant": label, "miou": metrics["miou"], **agreement})
            print(f"  {label}: mIoU {metrics['miou']:.2f}", file=sys.stderr)
    return rows


def print_report(result: dict[str, Any]) -> None:
    from kaseg.tools.bench import PATH_LABELS

    row = result["bench"]
    paths = row["paths"]
    onnx_ms = paths["onnx"]["latency_ms"]
    print(f"model {row['model']}: {row['gflops']:.2f} GFLOPs per image, input 1 x 3 x {row['size'][0]} x "
          f"{row['size'][1]}, {row['threads']} thread(s)")
    print(f"machine fp32 peak (2048 x 2048 matmul, best of 5): {row['peak_gflops']:.1f} GFLOP/s")
    header = (f"{'path':38s} {'median ms':>9s} {'p90 ms':>8s} {'GFLOP/s':>8s} {'of peak':>7s} {'x eager':>7s} "
              f"{'x ort fp32':>10s}")
    print(header)
    print("-" * len(header))
    for name, stats in paths.items():
        print(f"{PATH_LABELS[name]:38s} {stats['latency_ms']:9.1f} {stats['latency_p90_ms']:8.1f} "
              f"{stats['gflops_per_s']:8.1f} {stats['peak_fraction']:7.0%} {stats['speedup']:7.2f} "
              f"{onnx_ms / stats['latency_ms']:10.2f}")
    print("int8 GFLOP/s count the fp32 model's FLOPs (equivalent FLOPs); paths timed in turns")
    targets = result["targets"]
    met = targets["met"]
    print(f"target onnxruntime fp32 >= {TARGETS['onnx_over_eager']}x eager contiguous: "
          f"{targets['onnx_over_eager']:.2f}x {'met' if met['onnx_over_eager'] else 'NOT met'}")
    print(f"target int8 >= {TARGETS['int8_over_onnx']}x onnxruntime fp32: "
          f"{targets['int8_over_onnx']:.2f}x {'met' if met['int8_over_onnx'] else 'NOT met'}")
    print(f"target fastest path <= {TARGETS['fastest_ms']:.0f} ms: {PATH_LABELS[targets['fastest_path']]} "
          f"{targets['fastest_ms']:.1f} ms {'met' if met['fastest_ms'] else 'NOT met'}")
    if "sweep_speed" in result:
        print("\nint8 recipes (random calibration; speed only), timed in turns with onnxruntime fp32")
        for entry in result["sweep_speed"]:
            print(f"  {entry['recipe']:62s} {entry['latency_ms']:7.1f} ms  p90 {entry['latency_p90_ms']:7.1f}  "
                  f"{entry['over_fp32']:.2f}x fp32")
    if "sweep_accuracy" in result:
        print("\naccuracy (checkpoint's data set; agreement with PyTorch on held-out training images)")
        for entry in result["sweep_accuracy"]:
            print(f"  {entry['variant']:62s} mIoU {entry['miou']:6.2f}  "
                  f"agreement {100 * entry['argmax_agreement']:6.2f}%  "
                  f"max |diff| {entry['max_abs_diff']:.3g} (largest logit {entry['logit_scale']:.3g})")


if __name__ == "__main__":
    main()
