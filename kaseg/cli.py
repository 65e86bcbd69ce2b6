"""The ``kaseg`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

import yaml


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run from its last.pt (train.resume=auto)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    from kaseg.config import load_config

    overrides = list(args.overrides) + list(extra)
    if getattr(args, "resume", False):
        overrides.append("train.resume=auto")
    return load_config(args.config, overrides)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _parse_model_args(pairs: Sequence[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"model argument {pair!r} must look like key=value (e.g. width=0.5)")
        key, value = pair.split("=", 1)
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def cmd_train(args: argparse.Namespace) -> None:
    from kaseg.stages import train_segmenter

    train_segmenter(_load(args))


def cmd_train_ae(args: argparse.Namespace) -> None:
    from kaseg.stages import train_autoencoder

    train_autoencoder(_load(args))


def cmd_distill(args: argparse.Namespace) -> None:
    from kaseg.stages import distill

    distill(_load(args))


def cmd_eval(args: argparse.Namespace) -> None:
    from kaseg.engine.distributed import is_main_process
    from kaseg.stages import evaluate_checkpoint
    from kaseg.tools.export import evaluate_onnx

    extra = []
    if args.multi_scale:
        extra.append(f"eval.scales=[{args.multi_scale}]")
    if args.flip:
        extra.append("eval.flip=true")
    if args.sliding:
        crop, stride = args.sliding
        extra += ["eval.mode=sliding", f"eval.crop_size=[{crop},{crop}]", f"eval.stride=[{stride},{stride}]"]
    config = _load(args, extra)
    if args.onnx:
        metrics = evaluate_onnx(config, args.onnx)
    else:
        metrics = evaluate_checkpoint(config, args.checkpoint)
    if not is_main_process():
        return
    if args.json:
        _print_json(metrics)
        return
    if args.onnx:
        print(f"{args.onnx}: onnxruntime {metrics['precision']}")
    print(f"mIoU {metrics['miou']:.2f}  pixel acc {metrics['pixel_acc']:.2f}  mean acc {metrics['mean_acc']:.2f}")
    for name, iou in metrics["iou"].items():
        print(f"  {name:24s} {'absent' if iou is None else f'{iou:6.2f}'}")


def cmd_info(args: argparse.Namespace) -> None:
    from kaseg.tools.bench import build_model_spec
    from kaseg.tools.profile import model_profile

    model = build_model_spec(args.model, _parse_model_args(args.model_args))
    profile = model_profile(model, tuple(args.size))
    if args.json:
        _print_json({"model": args.model, **profile})
        return
    print(f"model           {args.model}")
    print(f"parameters      {profile['params'] / 1e6:.3f} M")
    print(f"FLOPs           {profile['gflops']:.3f} G  (a multiply-add counts as 2 FLOPs)")
    print(f"MACs            {profile['macs'] / 1e9:.3f} G  (multiply-adds)")
    print(f"output stride   {profile['output_stride']}")
    print(f"features        {profile['feature_shape']} (stride {profile['feature_stride']})")


def cmd_bench(args: argparse.Namespace) -> None:
    from kaseg.tools.bench import bench, format_table

    rows = bench(
        args.models,
        size=tuple(args.size),
        batch=args.batch,
        device=args.device,
        onnx=args.onnx,
        int8=args.int8,
        compile=args.compile,
        runs=args.runs,
        threads=args.threads,
    )
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows))


def cmd_export(args: argparse.Namespace) -> None:
    from kaseg.tools.export import export_onnx, format_export_report

    if args.overrides and not args.config:
        raise SystemExit("kaseg export: key=value overrides need --config (the data set to calibrate on)")
    data = _load(args).data if args.config else None
    report = export_onnx(
        args.checkpoint,
        args.onnx,
        size=tuple(args.size),
        dynamic=args.dynamic,
        tolerance=args.tolerance,
        int8=args.int8,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
        data=data,
        min_agreement=args.min_agreement,
    )
    print(json.dumps(report, indent=2) if args.json else format_export_report(report))


def cmd_convert(args: argparse.Namespace) -> None:
    from kaseg.engine.checkpoint import convert_to_safetensors

    path = convert_to_safetensors(args.checkpoint, args.safetensors, fp16=args.fp16)
    print(f"wrote {path}")


def cmd_predict(args: argparse.Namespace) -> None:
    from kaseg.tools.predict import predict_files

    result = predict_files(
        args.checkpoint,
        args.inputs,
        args.out,
        onnx=args.onnx,
        overlay=args.overlay,
        crop_size=tuple(args.crop_size) if args.crop_size else None,
        device=args.device,
        memory_format=args.memory_format,
    )
    for path, error in result["failed"].items():
        print(f"failed: {path}: {error}", file=sys.stderr)
    print(f"wrote {len(result['written'])} mask(s) to {args.out} with {result['path']}; "
          f"{len(result['failed'])} failed")
    if result["failed"]:
        raise SystemExit(1)


def cmd_diagnose(args: argparse.Namespace) -> None:
    from kaseg.tools.diagnose import diagnose, format_diagnosis, write_diagnosis

    result = diagnose(
        args.runs,
        teacher=args.teacher,
        train_images=args.train_images,
        val_images=args.val_images,
        steps=args.steps,
    )
    if args.out:
        write_diagnosis(result, args.out)
    if args.json:
        _print_json(result)
    else:
        print(format_diagnosis(result))


def cmd_demo(args: argparse.Namespace) -> None:
    from kaseg.tools.demo import format_summary, run_demo

    out = args.out or ("runs/demo-full" if args.full else "runs/demo")
    summary = run_demo(
        out, quick=args.quick, full=args.full, compare=args.compare, seed=args.seed,
        train_teacher=args.train_teacher,
    )
    if args.json:
        _print_json(summary["rows"])
    else:
        print(format_summary(summary))
        print(f"report: {summary['report']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaseg", description="Knowledge adaptation for efficient semantic segmentation."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a teacher or a student with cross-entropy")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-ae", help="train the auto-encoder on a frozen teacher (stage 1)")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_train_ae)

    p = sub.add_parser("distill", help="distil a student from a teacher (stage 2)")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="evaluate a checkpoint or an exported ONNX model (mIoU and per-class IoU)")
    p.add_argument("--config", required=True)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a segmenter checkpoint, run in PyTorch")
    model.add_argument("--onnx", metavar="MODEL.onnx", help="an exported model (fp32 or int8), run in onnxruntime")
    p.add_argument("--multi-scale", metavar="S1,S2,...", help="scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped input")
    p.add_argument("--sliding", nargs=2, type=int, metavar=("CROP", "STRIDE"), help="sliding-window inference")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="parameters, FLOPs, stride and feature shape of a model")
    p.add_argument("model", help="a zoo name (see kaseg.list_models()) or a checkpoint path")
    p.add_argument("model_args", nargs="*", metavar="key=value", help="build arguments, e.g. width=0.5")
    p.add_argument("--size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="parameters, FLOPs and latency of models or checkpoints")
    p.add_argument("models", nargs="+", help="zoo names (with :key=value,... build args) or checkpoints")
    p.add_argument("--size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--onnx", action="store_true", help="also time the exported model in onnxruntime")
    p.add_argument("--int8", action="store_true", help="also time the int8 model in onnxruntime (implies --onnx)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (compiles for minutes)")
    p.add_argument("--threads", type=int, help="threads of every path (default: torch's count)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="export a student checkpoint to ONNX (fp32 or int8) and verify it")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True, metavar="OUT.onnx")
    p.add_argument("--size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial size")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs fp32 difference allowed")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ, per-channel), calibrated on training images")
    p.add_argument("--calibration", type=int, default=200, metavar="N", help="calibration images (default 200)")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="minmax (default, measured best); entropy equals minmax in onnxruntime 1.32; "
                   "entropy and percentile hold all calibration activations in memory")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="int8 vs PyTorch argmax agreement required on held-out training images")
    p.add_argument("--config", help="calibrate on this config's data set instead of the checkpoint's")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of --config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="write a checkpoint's model weights as .safetensors, to share them")
    p.add_argument("--checkpoint", required=True, help="a kaseg checkpoint (best.pt, last.pt)")
    p.add_argument("--safetensors", required=True, metavar="OUT.safetensors")
    p.add_argument("--fp16", action="store_true", help="store floating-point weights in half precision")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("predict", help="write palette PNG masks for images")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a segmenter checkpoint, run in PyTorch")
    model.add_argument("--onnx", metavar="MODEL.onnx", help="an exported model, run in onnxruntime on the CPU")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--overlay", action="store_true", help="also write colour overlays")
    p.add_argument("--crop-size", nargs=2, type=int, metavar=("H", "W"),
                   help="sliding window for large images (default: whole image)")
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                   help="PyTorch tensor layout (auto: channels_last on the CPU, where it is faster)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("diagnose", help="why distillation paid or not: curves, train vs val, headroom")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders, the student alone first")
    p.add_argument("--teacher", help="teacher checkpoint (default: teacher.checkpoint of a distillation run)")
    p.add_argument("--train-images", type=int, default=500, help="training images scored for the gap")
    p.add_argument("--val-images", type=int, default=500, help="validation images scored")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per fitted grid (headroom)")
    p.add_argument("--out", help="also write diagnosis.json into this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="run every stage on the built-in data set and report")
    p.add_argument("--out", help="run folder (default runs/demo, or runs/demo-full with --full)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a tiny version (under 2 minutes)")
    length.add_argument(
        "--full", action="store_true",
        help="the configs' schedule (4000 student iterations, the evidence protocol's; about an hour on 2 cores) "
        "instead of the demo's short one",
    )
    p.add_argument("--compare", action="store_true", help="also train the comparison methods")
    p.add_argument(
        "--train-teacher", action="store_true", help="train the teacher instead of using the shipped one"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from kaseg.config import ConfigError
    from kaseg.data import DataError
    from kaseg.engine.checkpoint import CheckpointError
    from kaseg.engine.distributed import cleanup
    from kaseg.engine.trainer import NonFiniteLossError
    from kaseg.models import PretrainedWeightsError

    # Problems with the user's input end with their message on one line, not a traceback.
    user_errors = (
        ConfigError, DataError, CheckpointError, PretrainedWeightsError, FileExistsError, FileNotFoundError,
        NonFiniteLossError,
    )
    try:
        args.func(args)
    except user_errors as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"kaseg {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
