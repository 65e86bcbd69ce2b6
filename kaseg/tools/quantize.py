"""Static int8 quantization of an exported segmenter with onnxruntime, calibrated on real images.

Post-training static quantization (Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018): every tensor x is
stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read back as ``x ~ s (q - z)``.
Weights get one symmetric scale per output channel (``z = 0``, ``s_c = max|W_c| / 127``);
activations get one asymmetric uint8 range per tensor, ``[min, max]`` over the
calibration images (``s = (max - min) / 255``). The ranges are what calibration is for:
they must come from images normalised exactly as in training, or the int8 model clips
(too narrow) or wastes its 256 levels (too wide).

The recipe (measured with ``benchmarks/deploy.py --sweep``, see README "Deployment"):
``quant_pre_process`` first (symbolic shape inference and onnxruntime's graph
optimisation: without it the exported graph passes conv biases through Identity nodes,
the quantizer leaves them in fp32, onnxruntime cannot fuse the integer convolutions and
the int8 model was 4x slower), then ``quantize_static`` in QDQ
format with uint8 activations x int8 per-channel weights (onnxruntime's x86 u8s8
kernels; int8 activations ran at fp32 speed, QOperator and per-tensor weights were no
faster, reduce_range lost accuracy on this VNNI CPU), MinMax calibration (entropy and
percentile were no better), and two layers kept in fp32: the first convolution (it reads
the raw normalised pixels) and the final bilinear resize of the logits (uint8 logits
create argmax ties, and onnxruntime's uint8 resize plus the dequantisation of the
full-size output cost more than the fp32 resize). Together these two gave the best
argmax agreement with PyTorch at no loss of speed.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kaseg.data import DataError, build_raw_dataset
from kaseg.data.transforms import TransformedDataset, eval_transform

logger = logging.getLogger("kaseg")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Options:
    """How ``quantize_static`` is called (the defaults are the measured recipe).

    Attributes:
        method: calibration: ``minmax`` (the observed range), ``entropy`` (KL-optimal
            clipping; onnxruntime 1.32 runs it with 128 histogram bins and 128 quantized
            bins, so its search has one candidate and it returns the MinMax ranges,
            checked scale by scale) or ``percentile`` (99.999th percentile of |x|). The
            two histogram methods keep every activation of every calibration image in
            memory (about 100 MB per 512 x 512 image for the MobileNetV2 student).
        per_channel: one weight scale per output channel instead of one per tensor.
        reduce_range: 7-bit weights, for CPUs without VNNI whose u8s8 products can
            saturate.
        quant_format: ``qdq`` (QuantizeLinear/DequantizeLinear pairs that onnxruntime
            fuses into integer kernels) or ``qoperator`` (QLinearConv and friends).
        activation_type, weight_type: ``uint8`` or ``int8``.
        keep_fp32: parts left in floating point: ``first_conv`` (the stem, which sees the
            raw normalised pixels) and/or ``final_resize`` (the bilinear upsampling of the
            logits to the input size, whose uint8 output can create argmax ties).
    """

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    reduce_range: bool = False
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "int8"
    keep_fp32: tuple[str, ...] = ("first_conv", "final_resize")

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {list(CALIBRATION_METHODS)}")
        unknown = sorted(set(self.keep_fp32) - {"first_conv", "final_resize"})
        if unknown:
            raise ValueError(f"keep_fp32 {unknown} not understood; valid: first_conv, final_resize")


# ---------------------------------------------------------------- calibration images


def calibration_images(
    data: Any,
    count: int,
    *,
    size: tuple[int, int] | None = None,
    extra: int = 0,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Normalised training images for calibration, and ``extra`` more for checking.

    The images are a seeded random subset of ``data.train_split`` (a sorted split, such as
    Cityscapes by city, would otherwise calibrate on one city), read through kaseg's data
    set classes and the evaluation transform: normalised with ``data.mean``/``data.std``
    exactly like training and evaluation images, never randomly augmented.

    Args:
        data: a ``DataConfig`` (for example the checkpoint's run config's ``data``).
        count: calibration images (fewer when the split is smaller).
        size: H, W of a fixed-size model: each image is scaled to cover it (aspect kept,
            bilinear) and centre-cropped. ``None`` keeps every image's own size.
        extra: check images after the calibration ones (the same images again when the
            split has no others).
        seed: the subset's seed.

    Returns:
        ``(calibration, check)``: lists of 1 x 3 x H x W float32 tensors.

    Raises:
        DataError: the split cannot be read; the message names the data set and its root.
    """
    if count < 1:
        raise ValueError(f"calibration needs at least one image, got {count}")
    where = f"data set {data.name!r} (root {data.root!r}, split {data.train_split!r})"
    try:
        raw = build_raw_dataset(data, data.train_split)
        dataset = TransformedDataset(raw, eval_transform(mean=data.mean, std=data.std))
        if len(dataset) == 0:
            raise DataError("the split is empty")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = order[:count]
        held_out = order[count : count + extra] or chosen[:extra]
        if len(chosen) < count:
            logger.warning("%s has %d images; calibrating on all of them (asked for %d)", where, len(chosen), count)
        calibration = [_fit(dataset[i][0][None], size) for i in chosen]
        check = [_fit(dataset[i][0][None], size) for i in held_out]
    except (DataError, OSError, ValueError, KeyError, IndexError) as error:
        raise DataError(
            f"cannot read int8 calibration images from {where}: {error}; set the data set in the "
            "checkpoint's config or pass --config (and data.root=...) to `kaseg export`"
        ) from error
    return calibration, check


def _fit(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """1 x 3 x h x w -> 1 x 3 x H x W: scale to cover (aspect kept), centre crop."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image.contiguous()
    height, width = image.shape[-2:]
    scale = max(size[0] / height, size[1] / width)
    scaled = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    image = F.interpolate(image, size=scaled, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2
    return image[..., top : top + size[0], left : left + size[1]].contiguous()


# ---------------------------------------------------------------- quantization


def _reader(input_name: str, images: Sequence[torch.Tensor]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class TensorReader(CalibrationDataReader):
        """Feeds the calibration inputs one at a time."""

        def __init__(self) -> None:
            self.feeds = iter([{input_name: image.numpy().astype(np.float32)} for image in images])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    return TensorReader()


def _excluded_nodes(model: Any, keep_fp32: Iterable[str]) -> list[str]:
    """Names of the first Conv and/or the Resize that produces the graph output."""
    nodes = list(model.graph.node)
    excluded = []
    if "first_conv" in keep_fp32:
        excluded += [n.name for n in nodes if n.op_type == "Conv"][:1]
    if "final_resize" in keep_fp32:
        outputs = {o.name for o in model.graph.output}
        excluded += [n.name for n in nodes if n.op_type == "Resize" and set(n.output) & outputs]
    return excluded


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    images: Sequence[torch.Tensor],
    *,
    input_name: str = "images",
    options: Int8Options = Int8Options(),
) -> Path:
    """Writes the static int8 version of the fp32 ONNX model at ``fp32_path`` to ``out_path``.

    Args:
        fp32_path: an fp32 model written by :func:`kaseg.tools.export.write_onnx`.
        out_path: the int8 file (replaced if it exists); its metadata is copied from the
            fp32 file.
        images: calibration inputs of the shape the model takes, normalised
            (:func:`calibration_images` gives 1 x 3 x H x W).
        options: the quantization recipe.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not images:
        raise ValueError("int8 quantization needs at least one calibration image")
    if options.method != "minmax":
        logger.warning(
            "%s calibration keeps every activation of all %d calibration images in memory; "
            "use fewer images (--calibration) if memory runs out", options.method, len(images),
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="kaseg-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        with _quiet_onnxruntime():
            quant_pre_process(str(fp32_path), str(prepared))
            model = onnx.load(str(prepared))
            quantize_static(
                str(prepared),
                str(out_path),
                _reader(input_name, images),
                quant_format=QuantFormat.QDQ if options.quant_format == "qdq" else QuantFormat.QOperator,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=types[options.activation_type],
                weight_type=types[options.weight_type],
                nodes_to_exclude=_excluded_nodes(model, options.keep_fp32),
                calibrate_method=methods[options.method],
                # No CalibMaxIntermediateOutputs: onnxruntime 1.32 drops each full chunk
                # without folding it into the ranges. MinMax keeps only two reduced
                # values per tensor and image anyway; the histogram methods keep every
                # activation of every image (~100 MB per 512 x 512 image here).
            )
    copy_metadata(fp32_path, out_path)
    return out_path


def copy_metadata(source: str | Path, target: str | Path) -> None:
    """Copies the ``metadata_props`` of one ONNX file to another (quantization drops them)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    if props:
        model = onnx.load(str(target))
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
        onnx.save(model, str(target))


class _quiet_onnxruntime:
    """Silences onnxruntime's and the quantizer's warnings about graph clean-up (they list
    every folded constant) while quantizing; real failures still raise."""

    def __enter__(self) -> None:
        import onnxruntime

        self.root_level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs through the root logger
        onnxruntime.set_default_logger_severity(3)

    def __exit__(self, *exc: Any) -> None:
        import onnxruntime

        logging.getLogger().setLevel(self.root_level)
        onnxruntime.set_default_logger_severity(2)


# ---------------------------------------------------------------- checking


@torch.no_grad()
def compare_logits(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[torch.Tensor],
) -> dict[str, float]:
    """How far ``candidate``'s logits are from ``reference``'s on ``images``.

    Returns:
        ``max_abs_diff`` (largest absolute logit difference), ``logit_scale`` (largest
        absolute reference logit, for scale) and ``argmax_agreement`` (fraction of pixels
        whose predicted class is the same).
    """
    max_abs_diff, scale, agree, pixels = 0.0, 0.0, 0, 0
    for image in images:
        expected = reference(image).double()
        actual = candidate(image).double()
        if actual.shape != expected.shape:
            raise RuntimeError(f"logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        max_abs_diff = max(max_abs_diff, float((actual - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
        agree += int((actual.argmax(1) == expected.argmax(1)).sum())
        pixels += expected[:, 0].numel()
    return {"max_abs_diff": max_abs_diff, "logit_scale": scale, "argmax_agreement": agree / max(pixels, 1)}
