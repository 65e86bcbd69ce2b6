"""``kaseg bench`` and ``kaseg info``: the cost of zoo models and checkpoints side by side.

Parameters and FLOPs come from ``kaseg.tools.profile``. Latency is measured on every
inference path a deployer could use, at the same input size and threads, taking turns
(:func:`kaseg.tools.profile.time_interleaved`) so that a shared machine's load falls on
all of them alike:

* ``eager``: PyTorch fp32, contiguous (NCHW) tensors, the training-time default;
* ``channels_last``: PyTorch fp32 with NHWC tensors (oneDNN's native CPU layout);
* ``compile``: ``torch.compile`` of the channels_last model (on request: it compiles for
  minutes and, measured on a 2-core CPU, was not faster than channels_last);
* ``onnx``: the exported fp32 graph in onnxruntime (:func:`kaseg.tools.export.onnx_session`);
* ``int8``: the static int8 graph (:mod:`kaseg.tools.quantize`) in onnxruntime. Speed does
  not depend on the calibration ranges, so bench calibrates on random inputs; accuracy
  needs `kaseg export --int8` (real training images) and `kaseg eval --onnx`.

Each path's rate (model FLOPs / latency) is reported as a fraction of the machine's fp32
matrix-multiply rate on the same threads (:func:`kaseg.tools.profile.matmul_peak_gflops`);
for int8 the FLOPs are the fp32 model's (equivalent FLOPs).
"""

from __future__ import annotations

import copy
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import yaml

from kaseg.engine.distributed import local_device
from kaseg.models import MODELS, build_model
from kaseg.models.external import build_external, load_model_weights
from kaseg.stages import load_segmenter
from kaseg.tools.profile import (
    achieved_rate,
    latency_stats,
    matmul_peak_gflops,
    model_profile,
    time_interleaved,
)

DEFAULT_NUM_CLASSES = 21
EXTERNAL_SOURCES = ("torchvision", "smp", "python")  # `SOURCE:NAME` model specs
WARMUP_RUNS = 3

# A comma that starts the next "key=" (so list values such as aspp_rates=[6,12,18] keep theirs).
_ARGUMENT_SEPARATOR = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")


def load_any_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """A checkpoint (when ``spec`` is an existing file), a zoo model or an external model, in eval mode.

    Args:
        spec: a checkpoint path, a name from ``kaseg.list_models()``, or ``SOURCE:NAME``
            for another source: ``torchvision:lraspp_mobilenet_v3_large``, ``smp:Unet``,
            ``python:package.module:function``.
        kwargs: build arguments (``num_classes`` defaults to 21). For an external model
            also ``features`` (the tap) and ``weights_file`` (a local weights file, what
            ``model.weights`` is in a config); the others go to the builder (torchvision's
            ``weights=DEFAULT`` asks for its hub weights). For a checkpoint the architecture is read from the file;
            only ``num_classes`` may be given, and it must match.
    """
    if Path(spec).is_file():
        unknown = sorted(set(kwargs) - {"num_classes"})
        if unknown:
            raise ValueError(
                f"{spec!r} is a checkpoint, whose architecture is stored in it; build arguments "
                f"{unknown} apply to zoo names only"
            )
        return load_segmenter(spec, num_classes=kwargs.get("num_classes"))
    source, name, _ = _split_source(spec)
    if source is not None:
        arguments = dict(kwargs)
        num_classes = arguments.pop("num_classes", DEFAULT_NUM_CLASSES)
        features, weights = arguments.pop("features", None), arguments.pop("weights_file", None)
        model = build_external(source, name=name, num_classes=num_classes, kwargs=arguments, features=features)
        return (load_model_weights(model, weights) if weights is not None else model).eval()
    if spec not in MODELS and (spec.endswith((".pt", ".pth")) or "/" in spec or "\\" in spec):
        raise FileNotFoundError(
            f"checkpoint {spec!r} does not exist (and it is not a zoo model; zoo names: "
            f"{', '.join(MODELS.names())})"
        )
    return build_model(spec, **{"num_classes": DEFAULT_NUM_CLASSES, **kwargs}).eval()


def build_model_spec(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """:func:`load_any_model`, with a bad name or argument raised as a one-line config error."""
    from kaseg.config import ConfigError
    from kaseg.engine.checkpoint import CheckpointError

    try:
        return load_any_model(spec, kwargs)
    except CheckpointError:
        raise
    except (ValueError, TypeError, ImportError) as error:  # a model name, argument or feature tap
        raise ConfigError(f"model {spec!r}: {error}") from None


def parse_model_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})``; values are YAML.

    ``deeplabv3_mobilenetv2:width=0.5,aspp=false`` gives
    ``("deeplabv3_mobilenetv2", {"width": 0.5, "aspp": False})``. An external model keeps
    its source: ``torchvision:fcn_resnet50:features=classifier.3`` gives
    ``("torchvision:fcn_resnet50", {"features": "classifier.3"})`` (a factory has its own
    colon: ``python:package.module:function:key=value``). An existing file is returned as
    it is (a checkpoint path may contain ``:``).
    """
    if Path(text).is_file() or ":" not in text:
        return text, {}
    source, name, arguments = _split_source(text)
    if source is not None:
        name = f"{source}:{name}"
    else:
        name, arguments = text.split(":", 1)
    kwargs: dict[str, Any] = {}
    for pair in _ARGUMENT_SEPARATOR.split(arguments) if arguments and arguments.strip() else []:
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


def _split_source(text: str) -> tuple[str | None, str, str | None]:
    """``"torchvision:NAME:ARGS"`` -> ``("torchvision", "NAME", "ARGS")``; no source: ``(None, text, None)``."""
    source, _, rest = text.partition(":")
    if source not in EXTERNAL_SOURCES:
        return None, text, None
    parts = rest.split(":")
    name_parts = 2 if source == "python" else 1  # package.module:function
    arguments = ":".join(parts[name_parts:]) if len(parts) > name_parts else None
    return source, ":".join(parts[:name_parts]), arguments


PATHS = ("eager", "channels_last", "compile", "onnx", "int8")
PATH_LABELS = {
    "eager": "eager fp32",
    "channels_last": "eager fp32 channels_last",
    "compile": "torch.compile fp32 channels_last",
    "onnx": "onnxruntime fp32",
    "int8": "onnxruntime int8 (equivalent FLOPs)",
}
ONNX_PATHS = ("onnx", "int8")
_RANDOM_CALIBRATION_IMAGES = 4


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Runs the block with ``threads`` intra-op threads (default: the current count)."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def path_runners(
    model: nn.Module,
    images: torch.Tensor,
    paths: Sequence[str],
    *,
    threads: int,
    workdir: str | Path,
) -> dict[str, Callable[[], Any]]:
    """A no-argument callable per path that runs one forward pass of ``images`` and waits for it.

    ``model`` and ``images`` stay where they are for ``eager``; the other PyTorch paths
    use NHWC copies, the onnxruntime paths CPU copies exported under ``workdir``.
    """
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"unknown inference path(s) {unknown}; valid: {', '.join(PATHS)}")
    device = images.device
    runners: dict[str, Callable[[], Any]] = {}

    def torch_runner(module: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                module(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    if "eager" in paths:
        runners["eager"] = torch_runner(model, images)
    if "channels_last" in paths or "compile" in paths:
        nhwc_model = _channels_last_copy(model)
        nhwc_images = images.contiguous(memory_format=torch.channels_last)
        if "channels_last" in paths:
            runners["channels_last"] = torch_runner(nhwc_model, nhwc_images)
        if "compile" in paths:
            runners["compile"] = torch_runner(torch.compile(nhwc_model), nhwc_images)
    if set(paths) & set(ONNX_PATHS):
        runners.update(_onnx_runners(model, images, paths, threads=threads, workdir=Path(workdir)))
    return {name: runners[name] for name in PATHS if name in runners}


def _channels_last_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last).eval()


def _onnx_runners(
    model: nn.Module, images: torch.Tensor, paths: Sequence[str], *, threads: int, workdir: Path
) -> dict[str, Callable[[], Any]]:
    from kaseg.tools.export import INPUT_NAME, onnx_session, write_onnx
    from kaseg.tools.quantize import quantize_onnx

    cpu_model = _cpu_copy(model)
    cpu_images = images.detach().cpu().float().contiguous()
    fp32 = write_onnx(cpu_model, workdir / "fp32.onnx", cpu_images)  # fixed to this input's shape
    feeds = {INPUT_NAME: cpu_images.numpy()}
    files = {"onnx": fp32}
    if "int8" in paths:
        generator = torch.Generator().manual_seed(0)
        shape = cpu_images.shape
        calibration = [torch.randn(shape, generator=generator) for _ in range(_RANDOM_CALIBRATION_IMAGES)]
        files["int8"] = quantize_onnx(fp32, workdir / "int8.onnx", calibration, input_name=INPUT_NAME)
    runners = {}
    for name in ONNX_PATHS:
        if name in paths:
            session = onnx_session(files[name], threads=threads)
            runners[name] = lambda session=session: session.run(None, feeds)
    return runners


def _cpu_copy(model: nn.Module) -> nn.Module:
    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu().float().eval()


def time_paths(
    model: nn.Module,
    size: tuple[int, int],
    paths: Sequence[str],
    *,
    batch: int = 1,
    runs: int = 10,
    warmup: int = WARMUP_RUNS,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{path: {"latency_ms", "latency_p90_ms"}}`` of ``model`` on a random ``batch`` x 3 x H x W input.

    The paths take turns (:func:`kaseg.tools.profile.time_interleaved`); PyTorch and
    onnxruntime use the same ``threads`` (default: torch's current count).
    """
    device = next(model.parameters()).device
    model = model.eval()
    images = torch.randn(batch, 3, *size, device=device)
    with torch_threads(threads) as used, tempfile.TemporaryDirectory(prefix="kaseg-bench-") as folder:
        runners = path_runners(model, images, paths, threads=used, workdir=folder)
        times = time_interleaved(runners, warmup=warmup, runs=runs)
    return {name: latency_stats(values) for name, values in times.items()}


def installed_paths(device: torch.device | str = "cpu") -> list[str]:
    """The inference paths available here without extra set-up (int8 needs calibration
    data for accuracy and compile minutes of compilation, so neither is included)."""
    paths = ["eager", "channels_last"]
    if torch.device(device).type == "cpu":
        try:
            from kaseg.tools.export import require_onnx

            require_onnx()
            paths.append("onnx")
        except ImportError:
            pass
    return paths


def fastest_latency(
    model: nn.Module,
    size: tuple[int, int],
    *,
    batch: int = 1,
    runs: int = 20,
    warmup: int = WARMUP_RUNS,
    threads: int | None = None,
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Times the installed inference paths of ``model`` and returns the fastest.

    Args:
        paths: the candidates; default :func:`installed_paths` (eager, channels_last, and
            onnxruntime fp32 on a CPU with onnxruntime installed). int8 is only a
            candidate when named, and its accuracy is the caller's to check.

    Returns:
        ``{"latency_ms", "latency_p90_ms", "path", "paths": {path: {"latency_ms",
        "latency_p90_ms"}}}`` with ``path`` the name of the fastest by median.
    """
    device = next(model.parameters()).device
    candidates = list(paths) if paths is not None else installed_paths(device)
    measured = time_paths(model, size, candidates, batch=batch, runs=runs, warmup=warmup, threads=threads)
    best = min(measured, key=lambda name: measured[name]["latency_ms"])
    return {**measured[best], "path": best, "paths": measured}


def bench(
    models: Sequence[str],
    *,
    size: tuple[int, int],
    batch: int = 1,
    device: str = "cpu",
    onnx: bool = False,
    int8: bool = False,
    compile: bool = False,
    channels_last: bool = True,
    runs: int = 10,
    threads: int | None = None,
    peak: bool = True,
) -> list[dict[str, Any]]:
    """Parameters, FLOPs and latency on every requested inference path, with ratios.

    Args:
        models: zoo names with optional build arguments (``name:key=value,...``, see
            :func:`parse_model_spec`) or checkpoint paths.
        size: H, W of the input.
        batch: images per forward pass for the latency (FLOPs are per image).
        device: ``cpu``, ``cuda`` or ``auto`` for the PyTorch paths (onnxruntime runs on the CPU).
        onnx: also time the exported fp32 model in onnxruntime.
        int8: also time the static int8 model in onnxruntime (implies ``onnx``).
        compile: also time ``torch.compile`` (minutes of compilation per model).
        channels_last: also time eager PyTorch with channels_last tensors.
        runs: timed forward passes per path (after warm-up); medians are reported.
        threads: intra-op threads of every path (default: torch's current count).
        peak: measure the machine's fp32 matrix-multiply rate for the ``peak_fraction``s.

    Returns:
        One dict per model: ``model``, ``params``, ``flops``, ``gflops``, ``macs`` (per
        image), ``output_stride``, ``device``, ``size``, ``batch``, ``threads``,
        ``peak_gflops`` (None without ``peak``), ``fastest_path`` and ``paths``:
        ``{path: {"latency_ms", "latency_p90_ms", "gflops_per_s", "peak_fraction",
        "speedup"}}`` (``speedup``: eager latency / this path's). The eager path's numbers
        are also ``latency_ms``/``latency_p90_ms``, onnxruntime fp32's
        ``onnx_latency_ms``/``onnx_latency_p90_ms``. With several models, ``params_ratio``,
        ``gflops_ratio``, ``latency_ratio`` (and ``onnx_latency_ratio``) compare each row
        with the first.
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
    onnx = onnx or int8
    if onnx:
        from kaseg.tools.export import require_onnx

        require_onnx()  # fail before any model is built
    paths = ["eager"] + ["channels_last"] * channels_last + ["compile"] * compile
    paths += ["onnx"] * onnx + ["int8"] * int8

    # Every model is built before anything is measured, so a bad spec fails at once.
    built = [(spec, build_model_spec(*parse_model_spec(spec))) for spec in models]
    rows = []
    with torch_threads(threads) as used:
        peak_gflops = _device_peak(target, used) if peak else None
        for spec, model in built:
            model = model.to(target)
            profile = model_profile(model, (height, width))
            row: dict[str, Any] = {
                "model": spec,
                "params": profile["params"],
                "flops": profile["flops"],
                "gflops": profile["gflops"],
                "macs": profile["macs"],
                "output_stride": profile["output_stride"],
            }
            measured = time_paths(model, (height, width), paths, batch=batch, runs=runs, threads=used)
            row["paths"] = _path_rates(measured, profile["flops"] * batch, peak_gflops)
            row.update(measured["eager"])
            if onnx:
                row.update(onnx_latency_ms=measured["onnx"]["latency_ms"],
                           onnx_latency_p90_ms=measured["onnx"]["latency_p90_ms"])
            row.update(
                fastest_path=min(measured, key=lambda p: measured[p]["latency_ms"]),
                device=str(target),
                size=[height, width],
                batch=batch,
                threads=used,
                peak_gflops=peak_gflops,
            )
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


_PEAKS: dict[int, float] = {}  # threads -> GFLOP/s, measured once per process


def _device_peak(device: torch.device, threads: int) -> float | None:
    """The fp32 matmul peak of the CPU on ``threads`` threads, measured once per process
    (a GPU run has no common peak: its PyTorch paths and onnxruntime's differ in device)."""
    if device.type != "cpu":
        return None
    if threads not in _PEAKS:
        _PEAKS[threads] = matmul_peak_gflops(threads)
    return _PEAKS[threads]


def _path_rates(
    measured: dict[str, dict[str, float]], flops: float, peak_gflops: float | None
) -> dict[str, dict[str, Any]]:
    eager = measured["eager"]["latency_ms"]
    return {
        name: {
            **stats,
            **achieved_rate(flops, stats["latency_ms"], peak_gflops),
            "speedup": eager / stats["latency_ms"] if stats["latency_ms"] > 0 else float("nan"),
        }
        for name, stats in measured.items()
    }


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

_PATH_COLUMNS = (
    ("model", "model", "{}"),
    ("path", "path", "{}"),
    ("median ms", "latency_ms", "{:.2f}"),
    ("p90 ms", "latency_p90_ms", "{:.2f}"),
    ("GFLOP/s", "gflops_per_s", "{:.1f}"),
    ("of peak", "peak_fraction", "{:.0%}"),
    ("x eager", "speedup", "{:.2f}"),
)


def _render(columns: Sequence[tuple[str, str, str]], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Header, rule and one line per row; the first column left-aligned, numbers right-aligned."""
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
        parts = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    return [render(headers), "  ".join("-" * w for w in widths)] + [render(line) for line in cells]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`bench` as fixed-width text: one line per model (ratios to the
    first row), then, when more than one path was timed, one line per model and path."""
    if not rows:
        return "(no models)"
    columns = [c for c in _COLUMNS if any(c[1] in row for row in rows)]
    lines = _render(columns, rows)
    first = rows[0]
    caption = (
        f"input {first['batch']} x 3 x {first['size'][0]} x {first['size'][1]} on {first['device']}"
        + (f", {first['threads']} thread(s)" if "threads" in first else "")
        + "; FLOPs per image (multiply-add = 2); latency median per batch"
    )
    lines.append(caption)
    path_rows = [
        {"model": row["model"], "path": PATH_LABELS.get(name, name), **stats}
        for row in rows
        for name, stats in row.get("paths", {}).items()
    ]
    if len(path_rows) > len(rows):
        lines += [""] + _render(_PATH_COLUMNS, path_rows)
        peak = first.get("peak_gflops")
        lines.append(
            (f"peak: fp32 2048 x 2048 matrix multiply at {peak:.1f} GFLOP/s on the same threads; " if peak else "")
            + "GFLOP/s = model FLOPs / median latency (int8: the fp32 model's FLOPs, i.e. equivalent FLOPs); "
            "paths timed in turns"
        )
    return "\n".join(lines)
