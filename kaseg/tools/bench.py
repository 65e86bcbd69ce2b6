"""``kaseg bench`` and ``kaseg info``: the cost of zoo models and checkpoints side by side.

Parameters, FLOPs and PyTorch latency come from ``kaseg.tools.profile``; with ``onnx``
the model is also exported and timed in onnxruntime on the CPU.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from kaseg.engine.distributed import local_device
from kaseg.models import MODELS, Segmenter, build_model
from kaseg.stages import load_segmenter
from kaseg.tools.profile import _percentile, measure_latency, model_profile

DEFAULT_NUM_CLASSES = 21
WARMUP_RUNS = 3

# A comma that starts the next "key=" (so list values such as aspp_rates=[6,12,18] keep theirs).
_ARGUMENT_SEPARATOR = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")


def load_any_model(spec: str, kwargs: dict[str, Any]) -> Segmenter:
    """A checkpoint (when ``spec`` is an existing file) or a zoo model, in eval mode.

    Args:
        spec: a checkpoint path or a name from ``kaseg.list_models()``.
        kwargs: build arguments of a zoo model (``num_classes`` defaults to 21). For a
            checkpoint the architecture is read from the file; only ``num_classes`` may be
            given, and it must match.
    """
    if Path(spec).is_file():
        unknown = sorted(set(kwargs) - {"num_classes"})
        if unknown:
            raise ValueError(
                f"{spec!r} is a checkpoint, whose architecture is stored in it; build arguments "
                f"{unknown} apply to zoo names only"
            )
        return load_segmenter(spec, num_classes=kwargs.get("num_classes"))
    if spec not in MODELS and (spec.endswith((".pt", ".pth")) or "/" in spec or "\\" in spec):
        raise FileNotFoundError(
            f"checkpoint {spec!r} does not exist (and it is not a zoo model; zoo names: "
            f"{', '.join(MODELS.names())})"
        )
    return build_model(spec, **{"num_classes": DEFAULT_NUM_CLASSES, **kwargs}).eval()


def parse_model_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})``; values are YAML.

    ``deeplabv3_mobilenetv2:width=0.5,aspp=false`` gives
    ``("deeplabv3_mobilenetv2", {"width": 0.5, "aspp": False})``. An existing file is
    returned as it is (a checkpoint path may contain ``:``).
    """
    if Path(text).is_file() or ":" not in text:
        return text, {}
    name, arguments = text.split(":", 1)
    kwargs: dict[str, Any] = {}
    for pair in _ARGUMENT_SEPARATOR.split(arguments) if arguments.strip() else []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"model argument {pair!r} in {text!r} must look like key=value, e.g. "
                "deeplabv3_mobilenetv2:width=0.5,output_stride=16"
            )
        if key in kwargs:
            raise ValueError(f"model argument {key!r} is given twice in {text!r}")
        kwargs[key] = yaml.safe_load(value)
    return name, kwargs


def onnx_latency(
    model: Segmenter, size: tuple[int, int], *, batch: int = 1, runs: int = 10
) -> dict[str, float]:
    """Median and 90th-percentile onnxruntime (CPU) latency in milliseconds of ``model``.

    The model is exported to a temporary file for a fixed ``batch`` x 3 x H x W input.
    """
    from kaseg.tools.export import INPUT_NAME, onnx_session, write_onnx

    model = model.cpu().eval()
    images = torch.randn(batch, 3, *size)
    with tempfile.TemporaryDirectory(prefix="kaseg-bench-") as folder:
        path = write_onnx(model, Path(folder) / "model.onnx", images)
        session = onnx_session(path)
    feed = {INPUT_NAME: images.numpy()}
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return {"onnx_latency_ms": statistics.median(times), "onnx_latency_p90_ms": _percentile(times, 90)}


def bench(
    models: Sequence[str],
    *,
    size: tuple[int, int],
    batch: int = 1,
    device: str = "cpu",
    onnx: bool = False,
    runs: int = 10,
) -> list[dict[str, Any]]:
    """Parameters, FLOPs and latency of each model, with ratios to the first.

    Args:
        models: zoo names with optional build arguments (``name:key=value,...``, see
            :func:`parse_model_spec`) or checkpoint paths.
        size: H, W of the input.
        batch: images per forward pass for the latency (FLOPs are per image).
        device: ``cpu``, ``cuda`` or ``auto`` for the PyTorch timing.
        onnx: also export each model and time it in onnxruntime on the CPU.
        runs: timed forward passes (after warm-up); the median is reported.

    Returns:
        One dict per model: ``model``, ``params``, ``flops``, ``gflops``, ``macs`` (per
        image), ``output_stride``, ``latency_ms`` (median), ``latency_p90_ms`` (per batch),
        ``device``, ``size``, ``batch``, with ``onnx`` also ``onnx_latency_ms`` and
        ``onnx_latency_p90_ms``, and with several models ``params_ratio``,
        ``gflops_ratio``, ``latency_ratio`` (and ``onnx_latency_ratio``) to the first.
    """
    if not models:
        raise ValueError("bench needs at least one model name or checkpoint")
    if batch < 1 or runs < 1:
        raise ValueError(f"batch and runs must be at least 1, got batch={batch}, runs={runs}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive integers H W, got {tuple(size)}")
    target = local_device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if onnx:
        from kaseg.tools.export import require_onnx

        require_onnx()  # fail before any model is built

    rows = []
    for spec in models:
        name, kwargs = parse_model_spec(spec)
        model = load_any_model(name, kwargs)
        row: dict[str, Any] = {"model": spec}
        if onnx:  # on the CPU copy, before the model moves to the timed device
            row.update(onnx_latency(model, (height, width), batch=batch, runs=runs))
        model = model.to(target)
        profile = model_profile(model, (height, width))
        row.update(
            params=profile["params"],
            flops=profile["flops"],
            gflops=profile["gflops"],
            macs=profile["macs"],
            output_stride=profile["output_stride"],
        )
        row.update(measure_latency(model, (height, width), batch=batch, warmup=WARMUP_RUNS, runs=runs))
        row.update(device=str(target), size=[height, width], batch=batch)
        rows.append(row)
        del model
        if target.type == "cuda":
            torch.cuda.empty_cache()

    if len(rows) > 1:
        first = rows[0]
        keys = [("params", "params_ratio"), ("gflops", "gflops_ratio"), ("latency_ms", "latency_ratio")]
        if onnx:
            keys.append(("onnx_latency_ms", "onnx_latency_ratio"))
        for row in rows:
            for key, ratio in keys:
                row[ratio] = row[key] / first[key] if first[key] else float("nan")
    return rows


_COLUMNS = (
    # (header, row key, format)
    ("model", "model", "{}"),
    ("params (M)", "params", "{:.3f}"),
    ("GFLOPs", "gflops", "{:.3f}"),
    ("OS", "output_stride", "{}"),
    ("latency ms", "latency_ms", "{:.2f}"),
    ("p90 ms", "latency_p90_ms", "{:.2f}"),
    ("onnx ms", "onnx_latency_ms", "{:.2f}"),
    ("params x", "params_ratio", "{:.2f}"),
    ("GFLOPs x", "gflops_ratio", "{:.2f}"),
    ("latency x", "latency_ratio", "{:.2f}"),
    ("onnx x", "onnx_latency_ratio", "{:.2f}"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`bench` as a fixed-width text table (ratios are to the first row)."""
    if not rows:
        return "(no models)"
    columns = [c for c in _COLUMNS if any(c[1] in row for row in rows)]
    cells = []
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif key == "params":
                line.append(fmt.format(value / 1e6))
            else:
                line.append(fmt.format(value))
        cells.append(line)
    headers = [header for header, _, _ in columns]
    widths = [max(len(headers[i]), *(len(line[i]) for line in cells)) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        # The model name is left-aligned, numbers right-aligned.
        parts = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    first = rows[0]
    caption = (
        f"input {first['batch']} x 3 x {first['size'][0]} x {first['size'][1]} on {first['device']}; "
        "FLOPs per image (multiply-add = 2); latency median per batch"
    )
    lines = [render(headers), "  ".join("-" * w for w in widths)] + [render(line) for line in cells]
    return "\n".join(lines + [caption])
