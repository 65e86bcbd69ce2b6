"""ONNX export (fp32 and static int8) of a trained segmenter, verified with onnxruntime.

Only the deployable segmenter is exported: a checkpoint's ``model`` entry (never a
teacher, auto-encoder or adapter), wrapped so that the graph has one input ``images``
(B x 3 x H x W, normalised) and one output ``logits`` (B x K x H x W at the input size).
The file carries the run's data settings (mean, std, data set, classes) as ONNX metadata,
so ``kaseg predict --onnx`` and ``kaseg eval --onnx`` need nothing else.
:class:`OnnxLogits` runs an exported file as a logits function for kaseg's inference
and evaluation code.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kaseg.config import Config, DataConfig, from_dict
from kaseg.engine.checkpoint import CheckpointError, load_checkpoint
from kaseg.models import Segmenter
from kaseg.stages import SegmentationEvaluator, load_segmenter

logger = logging.getLogger("kaseg")

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_KEY = "kaseg"  # metadata_props entry: JSON {"precision", "arch", "data"}
DEFAULT_MIN_AGREEMENT = 0.9


class OnnxModelError(CheckpointError):
    """An ONNX model file is missing, unreadable, or does not fit the input or data set."""


class LogitsOnly(nn.Module):
    """A segmenter whose forward returns only the logits B x K x H x W (the deployed output)."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["logits"]


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or an ImportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"ONNX export and timing need the onnx and onnxruntime packages ({error}); "
            "install them with `pip install kaseg[onnx]`"
        ) from error
    return onnx, onnxruntime


def write_onnx(
    model: Segmenter, path: str | Path, sample: torch.Tensor, *, dynamic: bool = False, opset: int = 17
) -> Path:
    """Exports ``model``'s logits to ``path`` (overwritten), traced with ``sample``.

    With ``dynamic`` the batch, height and width axes are symbolic; otherwise the graph
    only accepts ``sample``'s shape.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model).eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter (dynamo=False), not torch 2.14's default torch.export one:
    # for these models the dynamo exporter takes ~25x longer, cannot emit opset 17 (it
    # falls back to 18 after a failed version conversion, with a traceback in the log),
    # and writes the weights to a separate .onnx.data file. The TorchScript exporter
    # gives one self-contained file at the requested opset in under a second (both
    # handle the dynamic axes, and match PyTorch to ~1e-6). torch deprecates it; when it
    # is removed, switch to dynamo=True with dynamic_shapes and opset >= 18.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            wrapper,
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None,
        )
    return path


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for the model file at ``path``, set up for latency.

    Every graph optimisation (``ORT_ENABLE_ALL``: constant folding, conv + BN + activation
    fusion, the NCHWc blocked layout), ``threads`` intra-op threads (default: torch's
    count, so onnxruntime and PyTorch are compared on the same cores), one inter-op
    thread and sequential execution (a segmentation net is a chain: parallel branches
    would only contend for the same cores).
    """
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # constant-folding chatter; errors still raise
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model {str(path)!r} does not exist")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise OnnxModelError(f"onnxruntime cannot load {str(path)!r}: {error}") from error


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The kaseg metadata of an exported file (``{}`` for a file exported elsewhere)."""
    onnx, _ = require_onnx()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}


def write_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    onnx, _ = require_onnx()
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, METADATA_KEY: json.dumps(metadata)})
    onnx.save(model, str(path))


class OnnxLogits:
    """An exported model as a logits function: normalised images B x 3 x H x W -> B x K x H x W.

    A model exported with a fixed batch of one runs a batch image by image (identical
    results). A model exported for a fixed H x W refuses other sizes with a message that
    says how to get one that fits (a dynamic export, ``--size``, or a sliding window of
    that size); it never resizes silently, which would change the metric.

    Attributes:
        path: the model file. session: its onnxruntime session (``threads`` intra-op
            threads, default torch's count). metadata: kaseg metadata.
        num_classes: K, or None when the file does not fix it.
        input_shape: the input's shape, a string for each symbolic axis.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.session = onnx_session(self.path, threads=self.threads)
        self.metadata = read_metadata(self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise OnnxModelError(
                f"{str(self.path)!r} is not a segmenter export: expected one B x 3 x H x W input, "
                f"got {[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = list(inputs[0].shape)
        classes = outputs[0].shape[1] if len(outputs[0].shape) == 4 else None
        self.num_classes = classes if isinstance(classes, int) else self.metadata.get("arch", {}).get("num_classes")

    @property
    def precision(self) -> str:
        return self.metadata.get("precision", "unknown")

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        height, width = self.input_shape[2:]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        if self.fixed_size is not None and size != self.fixed_size:
            height, width = self.fixed_size
            raise OnnxModelError(
                f"{str(self.path)!r} was exported for {height} x {width} inputs and cannot run a "
                f"{size[0]} x {size[1]} image; export it with --dynamic or --size {size[0]} {size[1]}, "
                f"or evaluate with a sliding window of its size (--sliding {height} STRIDE for a square export)"
            )
        batch = self.input_shape[0]
        if isinstance(batch, int) and batch != images.shape[0]:
            if batch != 1:
                raise OnnxModelError(
                    f"{str(self.path)!r} takes batches of exactly {batch}, got {images.shape[0]}"
                )
            return torch.cat([self(image[None]) for image in images])
        feed = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: feed})
        return torch.from_numpy(logits).to(images.device)


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    size: tuple[int, int] = (512, 512),
    dynamic: bool = False,
    tolerance: float = 1e-3,
    opset: int = 17,
    int8: bool = False,
    calibration: int = 200,
    calibration_method: str = "minmax",
    data: DataConfig | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> dict[str, Any]:
    """Exports a checkpoint's segmenter to ONNX (fp32, or static int8) and checks it.

    The fp32 graph is checked with ``onnx.checker`` and run in onnxruntime on a random
    input of ``size`` (with ``dynamic``, also on a batch of two at a second size,
    ``(H + 32, W - 32)``, or ``W + 32`` for ``W <= 32``); the largest absolute logit
    difference from PyTorch must not exceed ``tolerance``.

    With ``int8`` the checked fp32 graph is quantized (:mod:`kaseg.tools.quantize`),
    calibrated on ``calibration`` images of the training split of ``data`` (default: the
    data set the checkpoint was trained on), and the int8 file is checked with
    ``onnx.checker`` and compared with PyTorch on up to 8 other training images: the
    fraction of pixels with the same predicted class must reach ``min_agreement``.

    Args:
        checkpoint: a segmenter checkpoint written by ``kaseg train`` or ``kaseg distill``.
        out_path: the ``.onnx`` file to write (an existing file is replaced).
        size: H, W of the example input (and the only accepted size unless ``dynamic``).
        dynamic: symbolic batch, height and width.
        tolerance: the largest absolute fp32 logit difference accepted.
        opset: the ONNX operator set version.
        int8: write the static int8 model instead of the fp32 one.
        calibration: calibration images (int8 only).
        calibration_method: ``minmax``, ``entropy`` or ``percentile`` (int8 only).
        data: the data set to calibrate on, instead of the checkpoint's.
        min_agreement: the smallest int8 vs PyTorch argmax agreement accepted.

    Returns:
        ``{"path", "precision", "max_abs_diff", "input_size", "dynamic", "opset",
        "num_classes", "file_bytes"}``, with ``int8`` also ``int8_max_abs_diff``,
        ``int8_logit_scale``, ``int8_argmax_agreement``, ``check_images``,
        ``calibration_images``, ``calibration_method`` and ``calibration_data``.

    Raises:
        ImportError: onnx or onnxruntime is not installed.
        DataError: the calibration data set cannot be read (int8).
        RuntimeError: the exported model's logits differ from PyTorch's by more than
            ``tolerance`` or (int8) agree on fewer than ``min_agreement`` of the pixels
            (the file is kept for inspection).
    """
    onnx, _ = require_onnx()
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"export size must be two positive integers H W, got {tuple(size)}")
    if int8 and calibration < 1:
        raise ValueError(f"--calibration must be at least 1 image, got {calibration}")
    state = load_checkpoint(checkpoint)
    run_config = state.get("config")
    calibration_set: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    if int8:  # read the data before any export work: a wrong root fails in a second
        from kaseg.tools.quantize import Int8Options, calibration_images

        options = Int8Options(method=calibration_method)
        data = data or _checkpoint_data(run_config, checkpoint)
        calibration_set = calibration_images(
            data, calibration, size=None if dynamic else (height, width), extra=8
        )
    model = load_segmenter(checkpoint)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 3, height, width, generator=generator)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="kaseg-export-") as folder:
        fp32_path = Path(folder) / "fp32.onnx" if int8 else out_path
        path = write_onnx(model, fp32_path, sample, dynamic=dynamic, opset=opset)
        onnx.checker.check_model(str(path))
        max_abs_diff = _check_fp32(model, path, sample, dynamic, tolerance, generator)
        metadata = {
            "precision": "int8" if int8 else "fp32",
            "arch": state["arch"],
            "data": (run_config or {}).get("data") if data is None else _data_dict(data),
        }
        write_metadata(path, metadata)
        report: dict[str, Any] = {}
        if int8:
            from kaseg.tools.quantize import quantize_onnx

            calibration_inputs, check_inputs = calibration_set
            path = quantize_onnx(path, out_path, calibration_inputs, input_name=INPUT_NAME, options=options)
            report = _check_int8(model, path, check_inputs, min_agreement)
            report.update(
                calibration_images=len(calibration_inputs),
                calibration_method=options.method,
                calibration_data=f"{data.name}:{data.train_split}" + (f" ({data.root})" if data.root else ""),
            )
    written_opset = next(
        (entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import
         if entry.domain in ("", "ai.onnx")),
        opset,
    )
    logger.info("exported %s (%s, max abs difference %.2e)", path, metadata["precision"], max_abs_diff)
    return {
        "path": str(path),
        "precision": metadata["precision"],
        "max_abs_diff": max_abs_diff,
        "input_size": [height, width],
        "dynamic": dynamic,
        "opset": int(written_opset),
        "num_classes": model.num_classes,
        "file_bytes": path.stat().st_size,
        **report,
    }


def format_export_report(report: dict[str, Any]) -> str:
    """The result of :func:`export_onnx` as one or two lines of text."""
    lines = [
        f"wrote {report['path']} ({report['precision']}); onnxruntime fp32 vs PyTorch max abs logit "
        f"difference {report['max_abs_diff']:.2e}"
    ]
    if report["precision"] == "int8":
        lines.append(
            f"int8 vs PyTorch on {report['check_images']} training images not used for calibration: argmax "
            f"agreement {100 * report['int8_argmax_agreement']:.2f}%, max abs logit difference "
            f"{report['int8_max_abs_diff']:.3g} (largest logit {report['int8_logit_scale']:.3g}); calibrated on "
            f"{report['calibration_images']} images of {report['calibration_data']} ({report['calibration_method']})"
        )
    return "\n".join(lines)


def _checkpoint_data(run_config: dict[str, Any] | None, checkpoint: str | Path) -> DataConfig:
    """The DataConfig of the run that wrote ``checkpoint``."""
    if not run_config:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} stores no run config, so the data set to calibrate on "
            "is unknown; pass --config with the training config"
        )
    return from_dict(Config, run_config).data


def _data_dict(data: DataConfig) -> dict[str, Any]:
    from kaseg.config import to_dict

    return to_dict(data)


def _check_fp32(
    model: Segmenter,
    path: Path,
    sample: torch.Tensor,
    dynamic: bool,
    tolerance: float,
    generator: torch.Generator,
) -> float:
    """The largest absolute logit difference onnxruntime vs PyTorch (raises above ``tolerance``)."""
    height, width = sample.shape[-2:]
    checks = [sample]
    if dynamic:
        second_width = width - 32 if width > 32 else width + 32
        checks.append(torch.randn(2, 3, height + 32, second_width, generator=generator))
    session = onnx_session(path)
    max_abs_diff, worst_shape = 0.0, tuple(sample.shape)
    for images in checks:
        with torch.inference_mode():
            expected = model(images)["logits"].numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        if actual.shape != expected.shape:
            raise RuntimeError(
                f"onnxruntime returned logits of shape {actual.shape} for input {tuple(images.shape)}; "
                f"PyTorch returned {expected.shape} ({str(path)!r})"
            )
        diff = float(np.abs(actual.astype(np.float64) - expected).max())
        if not diff <= max_abs_diff:  # also catches NaN
            max_abs_diff, worst_shape = diff, tuple(images.shape)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(
            f"exported model {str(path)!r} differs from PyTorch by {max_abs_diff:.3g} (max abs "
            f"logit difference, input {worst_shape}), more than the tolerance {tolerance:g}; "
            "the file was kept for inspection"
        )
    return max_abs_diff


def _check_int8(model: Segmenter, path: Path, images: list[torch.Tensor], min_agreement: float) -> dict[str, Any]:
    """onnx.checker, then int8 vs PyTorch logits on held-out training images."""
    from kaseg.tools.quantize import compare_logits

    onnx, _ = require_onnx()
    onnx.checker.check_model(str(path))
    with torch.inference_mode():
        found = compare_logits(lambda x: model(x)["logits"], OnnxLogits(path), images)
    if not found["argmax_agreement"] >= min_agreement:
        raise RuntimeError(
            f"int8 model {str(path)!r} predicts the same class as PyTorch on only "
            f"{100 * found['argmax_agreement']:.1f}% of the pixels of {len(images)} training images "
            f"(required: {100 * min_agreement:.1f}%); try more --calibration images or another "
            "--calibration-method; the file was kept for inspection"
        )
    return {
        "int8_max_abs_diff": found["max_abs_diff"],
        "int8_logit_scale": found["logit_scale"],
        "int8_argmax_agreement": found["argmax_agreement"],
        "check_images": len(images),
    }


def evaluate_onnx(config: Config, onnx_path: str | Path) -> dict[str, Any]:
    """``kaseg eval --onnx``: an exported model (fp32 or int8) in onnxruntime on the CPU.

    The same validation split, transform, inference options and metrics as
    :func:`evaluate_checkpoint`; only the logits come from onnxruntime (one process,
    torch's thread count). The result also names the file and its ``precision``.
    """
    model = OnnxLogits(onnx_path)  # a bad file fails before the data set is read
    evaluator = SegmentationEvaluator(config, torch.device("cpu"))
    if model.num_classes is not None and model.num_classes != evaluator.num_classes:
        raise OnnxModelError(
            f"ONNX model {str(onnx_path)!r} predicts {model.num_classes} classes but the data set "
            f"has {evaluator.num_classes}"
        )
    metrics = evaluator.evaluate(model)
    return {**metrics, "onnx": str(onnx_path), "precision": model.precision}
