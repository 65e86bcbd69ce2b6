"""``kaseg diagnose``: why distillation did, or did not, pay.

Distillation adds targets that help a student generalise; it adds no capacity and no
optimisation steps, and it cannot teach what the student's output grid cannot draw.
So, for finished runs (a student alone and distilled students, usually), this measures:

* **curves**: validation mIoU over training, from each run's ``metrics.jsonl`` (still
  rising at the end: the schedule is too short to judge);
* **generalisation gap**: mIoU on training images minus mIoU on validation images, both
  on fixed subsets with the evaluation transform (no gap: the student underfits, and
  regularising targets have nothing to close);
* **per-class IoU** of every run and the teacher (where a distilled student gained or
  lost);
* **transferable headroom**: the mIoU of the best logit grid at the student's stride
  fitted to the teacher's predictions, scored against the ground truth: what a student
  that copied the teacher perfectly on its own grid would reach. Beside it, the same
  grid fitted to the ground truth: the ceiling of the stride itself.

The grids: a model at feature stride s predicts logits on a ceil(H/s) x ceil(W/s) grid
and upsamples them bilinearly. For each image the grid starts from the log of the
area-averaged one-hot target and is optimised with Adam on the cross-entropy of its
upsampled version (ignore pixels excluded), then arg-maxed.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml

from kaseg.config import Config, from_dict
from kaseg.data import IGNORE_INDEX, build_val_dataset
from kaseg.engine.logger import read_metrics
from kaseg.engine.metrics import confusion_matrix, segmentation_metrics
from kaseg.stages import load_segmenter

# A run whose validation mIoU rose by more than this over the last quarter of its
# evaluations is still learning.
RISING_POINTS = 1.0
# Gaps below this many mIoU points count as "no generalisation gap".
SMALL_GAP_POINTS = 2.0


def fitted_grid_predictions(targets: torch.Tensor, num_classes: int, stride: int, steps: int) -> torch.Tensor:
    """Arg-max (B x H x W) of the stride-``stride`` logit grids fitted to ``targets``
    (B x H x W class ids, 255 ignored) for ``steps`` Adam steps (see the module docstring)."""
    height, width = targets.shape[-2:]
    valid = (targets != IGNORE_INDEX).unsqueeze(1)
    one_hot = F.one_hot(torch.where(valid[:, 0], targets, 0), num_classes).permute(0, 3, 1, 2).float()
    grid = (-(-height // stride), -(-width // stride))
    average = F.adaptive_avg_pool2d(one_hot * valid, grid)

    def upsample(logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)

    logits = average.clamp(min=1e-3).log().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(upsample(logits), targets, ignore_index=IGNORE_INDEX).backward()
        optimizer.step()
    return upsample(logits.detach()).argmax(1)


def grid_ceiling(
    targets: torch.Tensor,
    truth: torch.Tensor,
    class_names: Sequence[str],
    stride: int,
    *,
    steps: int = 200,
    batch: int = 100,
) -> dict[str, Any]:
    """Metrics against ``truth`` of the stride-``stride`` grids fitted to ``targets``
    (both N x H x W): to the ground truth itself, the stride's ceiling; to a teacher's
    predictions, the transferable headroom."""
    matrix = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    for target, labels in zip(targets.split(batch), truth.split(batch)):
        prediction = fitted_grid_predictions(target, len(class_names), stride, steps)
        matrix += confusion_matrix(prediction, labels, len(class_names))
    return segmentation_metrics(matrix, class_names)


@torch.no_grad()
def predict_labels(model: torch.nn.Module, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """Arg-max predictions N x H x W of ``model`` on normalised images N x 3 x H x W."""
    return torch.cat([model(chunk)["logits"].argmax(1) for chunk in images.split(batch)])


def load_split(config: Config, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``limit`` images (all if None) of ``split`` with the evaluation transform,
    stacked (N x 3 x H x W, N x H x W), and the class names."""
    dataset = build_val_dataset(dataclasses.replace(config.data, val_split=split))
    count = len(dataset) if limit is None else min(limit, len(dataset))
    samples = [dataset[index] for index in range(count)]
    if len({tuple(mask.shape) for _, mask in samples}) != 1:
        raise ValueError(f"diagnose needs a {split} split whose images share one size (e.g. the built-in sets)")
    images = torch.stack([image for image, _ in samples])
    masks = torch.stack([mask.long() for _, mask in samples])
    return images, masks, list(dataset.dataset.classes)


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, validation mIoU) of every evaluation logged in ``run_dir``."""
    return [
        (entry["iteration"], entry["miou"])
        for entry in read_metrics(run_dir)
        if entry.get("split") == "val" and entry.get("miou") is not None
    ]


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a kaseg run folder (no config.yaml)")
    return from_dict(Config, yaml.safe_load(path.read_text()) or {})


def _checkpoint(run_dir: Path) -> Path:
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run {str(run_dir)!r} has no checkpoints/last.pt; has it finished?")
    return path


def diagnose(
    runs: Sequence[str | Path],
    *,
    teacher: str | Path | None = None,
    train_images: int = 500,
    val_images: int | None = 500,
    steps: int = 200,
) -> dict[str, Any]:
    """Diagnostics of finished runs (see the module docstring).

    Args:
        runs: run folders (``runs/<name>``) of segmenters trained on one data set; the
            first one's config gives the data set.
        teacher: the teacher's checkpoint; by default the ``teacher.checkpoint`` of the
            first run that names one (a distillation run does).
        train_images, val_images: sizes of the training and validation subsets (None: all).
        steps: Adam steps per fitted grid.

    Returns:
        ``{"runs": [{name, stride, curve, train_miou, val_miou, gap, iou, still_rising}],
        "teacher": {checkpoint, val_miou, iou} or None, "headroom": {stride,
        teacher_grid_miou, ground_truth_grid_miou} or None, "notes": [str]}``.
    """
    if not runs:
        raise ValueError("diagnose needs at least one run folder")
    configs = [run_config(Path(run)) for run in runs]
    config = configs[0]
    if teacher is None:
        teacher = next((c.teacher.checkpoint for c in configs if c.teacher.checkpoint), None)
    train_x, train_y, names = load_split(config, config.data.train_split, train_images)
    val_x, val_y, _ = load_split(config, config.data.val_split, val_images)

    entries = []
    for run, run_cfg in zip(runs, configs):
        model = load_segmenter(_checkpoint(Path(run)), num_classes=len(names)).float()
        train_metrics = _metrics(predict_labels(model, train_x), train_y, names)
        val_metrics = _metrics(predict_labels(model, val_x), val_y, names)
        curve = validation_curve(Path(run))
        entries.append({
            "name": run_cfg.name,
            "run": str(run),
            "stride": model.feature_stride,
            "curve": curve,
            "still_rising": _still_rising(curve),
            "train_miou": train_metrics["miou"],
            "val_miou": val_metrics["miou"],
            "gap": train_metrics["miou"] - val_metrics["miou"],
            "iou": val_metrics["iou"],
        })

    result: dict[str, Any] = {
        "train_images": len(train_x), "val_images": len(val_x), "runs": entries, "teacher": None, "headroom": None,
    }
    if teacher is not None:
        teacher_model = load_segmenter(teacher, num_classes=len(names)).float()
        teacher_labels = predict_labels(teacher_model, val_x)
        teacher_metrics = _metrics(teacher_labels, val_y, names)
        stride = entries[0]["stride"]
        result["teacher"] = {
            "checkpoint": str(teacher), "val_miou": teacher_metrics["miou"], "iou": teacher_metrics["iou"],
        }
        result["headroom"] = {
            "stride": stride,
            "teacher_grid_miou": grid_ceiling(teacher_labels, val_y, names, stride, steps=steps)["miou"],
            "ground_truth_grid_miou": grid_ceiling(val_y, val_y, names, stride, steps=steps)["miou"],
        }
    result["notes"] = notes(result)
    return result


def _metrics(prediction: torch.Tensor, truth: torch.Tensor, names: list[str]) -> dict[str, Any]:
    return segmentation_metrics(confusion_matrix(prediction, truth, len(names)), names)


def _still_rising(curve: list[tuple[int, float]]) -> bool | None:
    """Whether mIoU rose by more than RISING_POINTS over the last quarter of the curve."""
    if len(curve) < 4:
        return None
    last_quarter = curve[-max(2, len(curve) // 4) - 1 :]
    return last_quarter[-1][1] - statistics.mean(v for _, v in last_quarter[:-1]) > RISING_POINTS


def notes(result: dict[str, Any]) -> list[str]:
    """Plain-language findings, one per line."""
    lines = []
    runs = result["runs"]
    for entry in runs:
        if entry["gap"] < SMALL_GAP_POINTS:
            lines.append(
                f"{entry['name']}: train {entry['train_miou']:.1f} vs val {entry['val_miou']:.1f} mIoU: no "
                "generalisation gap; the student underfits, and distillation targets, which help a student "
                "generalise, have little to close (train longer or use a larger student)."
            )
        if entry["still_rising"]:
            lines.append(f"{entry['name']}: validation mIoU was still rising at the end; the schedule is short.")
    headroom, teacher = result["headroom"], result["teacher"]
    if headroom is not None:
        best = max(entry["val_miou"] for entry in runs)
        room = headroom["teacher_grid_miou"] - best
        lines.append(
            f"teacher {teacher['val_miou']:.1f} mIoU; a perfect copy of it on the stride-{headroom['stride']} grid "
            f"would score {headroom['teacher_grid_miou']:.1f} ({room:+.1f} over the best run here); the grid "
            f"itself caps any model at {headroom['ground_truth_grid_miou']:.1f}."
        )
        if room < SMALL_GAP_POINTS:
            lines.append(
                "little transferable headroom: the teacher's lead is mostly resolution the student's grid cannot draw."
            )
    if len(runs) > 1:
        base = runs[0]
        for entry in runs[1:]:
            changes = {
                name: (entry["iou"][name] or 0.0) - (base["iou"][name] or 0.0) for name in base["iou"]
            }
            ranked = sorted(changes.items(), key=lambda item: item[1])
            lines.append(
                f"{entry['name']} vs {base['name']}: {entry['val_miou'] - base['val_miou']:+.2f} mIoU; most gained "
                f"{ranked[-1][0]} ({ranked[-1][1]:+.1f}), most lost {ranked[0][0]} ({ranked[0][1]:+.1f})."
            )
    return lines


def format_diagnosis(result: dict[str, Any]) -> str:
    lines = [
        f"{'run':28s} {'stride':>6s} {'train mIoU':>11s} {'val mIoU':>9s} {'gap':>6s} {'rising':>7s}",
        "-" * 72,
    ]
    for entry in result["runs"]:
        rising = {True: "yes", False: "no", None: "-"}[entry["still_rising"]]
        lines.append(
            f"{entry['name']:28s} {entry['stride']:6d} {entry['train_miou']:11.2f} {entry['val_miou']:9.2f} "
            f"{entry['gap']:6.2f} {rising:>7s}"
        )
    lines.append(f"(train and val mIoU on {result['train_images']} and {result['val_images']} images)")
    lines += [""] + [f"* {note}" for note in result["notes"]]
    return "\n".join(lines)


def write_diagnosis(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "diagnosis.json"
    path.write_text(json.dumps(result, indent=2))
    return path
