"""The stages of the kaseg flow, each a function from a Config to a finished run folder.

``train_segmenter`` (teacher or student alone, cross-entropy), ``train_autoencoder``
(stage 1 of knowledge adaptation), ``distill`` (stage 2, or any configured method) and
``evaluate_checkpoint``. The CLI only parses arguments and calls these.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from kaseg.config import Config, ModelConfig, save_config, to_dict
from kaseg.data import IGNORE_INDEX, build_train_dataset, build_val_dataset
from kaseg.data.loader import eval_loader, sample_seed
from kaseg.distill import (
    AutoEncoderTraining,
    Distiller,
    FeatureDims,
    ReconstructionProbe,
    TeacherAutoEncoder,
    build_losses,
    stride_ratio_layers,
)
from kaseg.distill.teacher import TeacherFeatureStore
from kaseg.engine.checkpoint import CheckpointError, check_arch, load_checkpoint
from kaseg.engine.distributed import (
    all_reduce_sum,
    init_distributed,
    is_main_process,
    local_device,
    rank,
    world_size,
)
from kaseg.engine.evaluate import evaluate, inference_options
from kaseg.engine.trainer import TrainingJob, configure_determinism, fit, seed_everything
from kaseg.engine.visualize import colorize, denormalize, grid
from kaseg.models import Segmenter, build_from_config, build_model_from_arch

logger = logging.getLogger("kaseg")

# The seed stream of model initialisation (kaseg.data.loader.sample_seed): apart from the
# streams of the data order (1) and the augmentation (0).
MODEL_INIT_STREAM = 2


class SupervisedTraining(nn.Module):
    """A segmenter trained with cross-entropy alone: ``{"ce": CE(logits, masks)}``."""

    def __init__(self, model: Segmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(images)["logits"]
        return {"ce": F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)}


# ---------------------------------------------------------------- set-up helpers


def prepare_run(config: Config) -> torch.device:
    """Device, process group, seeds and the run folder with its resolved config."""
    device = local_device(config.train.device)
    init_distributed(device.type)
    configure_determinism(config.train.deterministic)
    seed_everything(config.seed)
    if is_main_process():
        config.run_dir.mkdir(parents=True, exist_ok=True)
        _warn_if_config_changed(config)
        save_config(config, config.run_dir / "config.yaml")
    return device


def _warn_if_config_changed(config: Config) -> None:
    """A resumed run keeps its folder; say which settings differ from the saved ones."""
    saved_path = config.run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    current = _flatten(to_dict(config))
    changed = sorted(k for k in saved.keys() | current.keys() if k != "train.resume" and saved.get(k) != current.get(k))
    if changed:
        logger.warning(
            "%s: the config differs from the one saved in %s: %s",
            config.name, saved_path, ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed),
        )


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def build_segmenter(model: ModelConfig, num_classes: int) -> nn.Module:
    """The configured model (any ``model.source``) with ``model.weights`` loaded."""
    return build_from_config(model, num_classes)


def build_student(config: Config, num_classes: int) -> Segmenter:
    """The model being trained, initialised from ``config.seed`` alone.

    Its own generator makes the initial weights independent of whatever was built or
    drawn before (a teacher, an auto-encoder): the student alone (``kaseg train``) and
    every distilled student of a seed start from identical weights, so a comparison
    between them measures the distillation loss and nothing else.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(config.seed, 0, stream=MODEL_INIT_STREAM))
        return build_segmenter(config.model, num_classes)


def load_segmenter(path: str | Path, *, num_classes: int | None = None) -> nn.Module:
    """A segmenter rebuilt from a checkpoint's ``arch`` with its weights, in eval mode."""
    if path is None:
        raise CheckpointError("no checkpoint given (set teacher.checkpoint or pass --checkpoint)")
    state = load_checkpoint(path)
    arch = state["arch"]
    if "name" not in arch:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {arch.get('type', 'non-segmenter')}, not a segmenter"
        )
    if num_classes is not None and arch["num_classes"] != num_classes:
        raise CheckpointError(
            f"checkpoint {str(path)!r} predicts {arch['num_classes']} classes but the data set "
            f"has {num_classes}"
        )
    try:
        model = build_model_from_arch(arch)
    except (ImportError, ValueError) as error:
        if arch.get("source", "kaseg") == "kaseg":
            raise
        raise CheckpointError(f"cannot rebuild the model of checkpoint {str(path)!r}: {error}") from None
    model.load_state_dict(state["model"])
    return model.eval()


class SegmentationEvaluator:
    """Validation of one model over the configured split (sharded across processes).

    ``evaluate(logits_fn)`` returns the metrics; ``pictures(logits_fn)`` a grid of the
    first ``eval.visuals`` images (image | ground truth | prediction) for TensorBoard.
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dataset = build_val_dataset(config.data)
        self.classes = self.dataset.dataset.classes
        self.palette = self.dataset.dataset.palette
        self.loader = eval_loader(
            self.dataset,
            batch_size=config.data.val_batch_size,
            workers=config.data.workers,
            rank=rank(),
            world_size=world_size(),
            pin_memory=device.type == "cuda",
        )
        self.inference = inference_options(config.eval, tuple(config.data.crop_size))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def evaluate(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        return evaluate(
            logits_fn,
            self.loader,
            num_classes=self.num_classes,
            class_names=self.classes,
            device=self.device,
            inference=self.inference,
        )

    @torch.no_grad()
    def pictures(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray | None:
        count = min(self.config.eval.visuals, len(self.dataset))
        if count == 0:
            return None
        rows = []
        for index in range(count):
            image, mask = self.dataset[index]
            prediction = logits_fn(image[None].to(self.device)).argmax(1)[0].cpu().numpy()
            rows.append([
                denormalize(image, self.config.data.mean, self.config.data.std),
                colorize(mask.numpy(), self.palette),
                colorize(prediction, self.palette),
            ])
        return grid(rows)


def _segmenter_logits(model: Segmenter) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: model(images)["logits"]


def _job_for_segmenter(
    module: nn.Module, trainable: nn.Module, model: Segmenter, evaluator: SegmentationEvaluator
) -> TrainingJob:
    def run_evaluation() -> dict[str, Any]:
        model.eval()
        return evaluator.evaluate(_segmenter_logits(model))

    return TrainingJob(
        module=module,
        trainable=trainable,
        export=model,
        evaluate=run_evaluation,
        pictures=lambda: evaluator.pictures(_segmenter_logits(model.eval())),
    )


# ---------------------------------------------------------------- stages


def train_segmenter(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """``kaseg train``: a teacher or a student alone, with cross-entropy."""
    device = prepare_run(config)
    train_dataset = build_train_dataset(config.data)
    evaluator = SegmentationEvaluator(config, device)
    model = build_student(config, evaluator.num_classes).to(device)
    job = _job_for_segmenter(SupervisedTraining(model), model, model, evaluator)
    seed_everything(config.seed)
    return fit(job, config, train_dataset=train_dataset, device=device, progress=progress)


def train_autoencoder(
    config: Config, *, progress: bool = True, teacher_store: TeacherFeatureStore | None = None
) -> dict[str, Any]:
    """``kaseg train-ae``: the auto-encoder on the frozen teacher's final features.

    ``teacher_store`` shares the cached teacher features with a later stage of this process
    (see :class:`kaseg.distill.teacher.TeacherFeatureStore`); by default ``teacher.cache_mb``
    gives this stage a cache of its own.
    """
    device = prepare_run(config)
    train_dataset = build_train_dataset(config.data)
    evaluator = SegmentationEvaluator(config, device)
    teacher = load_segmenter(config.teacher.checkpoint, num_classes=evaluator.num_classes).to(device)
    # The student's feature stride decides the code's grid (a light model to build).
    student_stride = build_segmenter(config.model, evaluator.num_classes).feature_stride
    autoencoder = TeacherAutoEncoder(
        teacher.feature_channels,
        config.autoencoder.code_channels,
        downsample_layers=stride_ratio_layers(teacher.feature_stride, student_stride),
        teacher_arch=teacher.arch,
    ).to(device)
    module = AutoEncoderTraining(
        teacher, autoencoder, alpha=config.autoencoder.alpha, teacher_cache_mb=config.teacher.cache_mb,
        teacher_store=teacher_store,
    )

    classifies = hasattr(teacher, "classify")
    if not classifies:
        logger.info(
            "the teacher's feature tap %r feeds no known classifier: the auto-encoder is evaluated by its "
            "relative reconstruction error only (no mIoU through the reconstruction)", teacher.arch.get("features"),
        )

    def run_evaluation() -> dict[str, Any]:
        autoencoder.eval()
        probe = ReconstructionProbe(teacher, autoencoder)
        metrics = evaluator.evaluate(probe)  # also sums the reconstruction error
        if not classifies:
            metrics = {}  # the mIoU of the teacher's own logits, not of the reconstruction
        error_sq, norm_sq = all_reduce_sum(probe.sums.to(device)).tolist()
        metrics["relative_error"] = (error_sq / max(norm_sq, 1e-30)) ** 0.5
        return metrics

    job = TrainingJob(module=module, trainable=autoencoder, export=autoencoder, evaluate=run_evaluation)
    return fit(job, config, train_dataset=train_dataset, device=device, progress=progress)


def load_autoencoder(
    path: str | Path, teacher: Segmenter, code_channels: int, downsample_layers: int
) -> TeacherAutoEncoder:
    """The trained auto-encoder of ``path``, checked against this teacher and code size."""
    if path is None:
        raise CheckpointError(
            "distill.autoencoder is true but autoencoder.checkpoint is not set; train one with "
            "`kaseg train-ae` or set distill.autoencoder=false"
        )
    autoencoder = TeacherAutoEncoder(
        teacher.feature_channels,
        code_channels,
        downsample_layers=downsample_layers,
        teacher_arch=teacher.arch,
    )
    state = load_checkpoint(path)
    check_arch(state["arch"], autoencoder.arch, path)
    autoencoder.load_state_dict(state["model"])
    return autoencoder


def distill(
    config: Config, *, progress: bool = True, teacher_store: TeacherFeatureStore | None = None
) -> dict[str, Any]:
    """``kaseg distill``: the student with cross-entropy plus the configured distillation losses
    (``teacher_store``: see :func:`train_autoencoder`)."""
    device = prepare_run(config)
    train_dataset = build_train_dataset(config.data)
    evaluator = SegmentationEvaluator(config, device)
    teacher = load_segmenter(config.teacher.checkpoint, num_classes=evaluator.num_classes)
    student = build_student(config, evaluator.num_classes)
    downsample_layers = stride_ratio_layers(teacher.feature_stride, student.feature_stride)
    encoder = None
    code_channels = teacher.feature_channels
    if config.distill.autoencoder:
        encoder = load_autoencoder(
            config.autoencoder.checkpoint, teacher, config.autoencoder.code_channels, downsample_layers
        )
        code_channels = config.autoencoder.code_channels
    dims = FeatureDims(
        student_channels=student.feature_channels,
        teacher_channels=teacher.feature_channels,
        code_channels=code_channels,
        num_classes=evaluator.num_classes,
    )
    distiller = Distiller(
        teacher,
        student,
        encoder=encoder,
        losses=build_losses(list(config.distill.losses), dims),
        ce_weight=config.distill.ce_weight,
        warmup_iterations=config.distill.warmup_iterations,
        teacher_cache_mb=config.teacher.cache_mb,
        teacher_store=teacher_store,
    ).to(device)
    job = _job_for_segmenter(distiller, distiller.trainable, student, evaluator)
    job.before_step = distiller.start_iteration
    seed_everything(config.seed)  # the training streams (dropout) start where `kaseg train`'s do
    return fit(job, config, train_dataset=train_dataset, device=device, progress=progress)


def evaluate_checkpoint(config: Config, checkpoint: str | Path) -> dict[str, Any]:
    """``kaseg eval``: a segmenter checkpoint on the configured validation split."""
    device = local_device(config.train.device)
    init_distributed(device.type)
    evaluator = SegmentationEvaluator(config, device)
    model = load_segmenter(checkpoint, num_classes=evaluator.num_classes).to(device)
    return evaluator.evaluate(_segmenter_logits(model))
