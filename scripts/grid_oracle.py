"""How much mIoU a model that predicts on a stride-s grid can reach at all.

    python scripts/grid_oracle.py --config kaseg/configs/shapes/student.yaml --strides 4 8 16 32

A segmenter at output stride s predicts logits on a grid of ceil(H/s) x ceil(W/s) cells
and upsamples them bilinearly (``Segmenter``). For each stride and each validation image
this script fits the best such logit grid to the ground truth directly: the grid starts
from the log of the area-averaged one-hot labels and is optimised with Adam on the
pixel-wise cross-entropy of its upsampled version (ignore pixels excluded), then
arg-maxed. The mIoU of these fitted grids is a practical ceiling for any model at that
output stride, whatever its features: if a student alone already sits near it, no
feature distillation on the same grid can add much. The area average without fitting is
printed too. The ceiling itself involves no model; it runs in a few minutes on a CPU.

With ``--checkpoint`` (repeatable) the same grids are also fitted to each model's
predictions instead of the ground truth and scored against the ground truth: for a
teacher at the student's stride, that is the mIoU of a student that copies the teacher's
predictions perfectly on its own grid.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kaseg.config import load_config
from kaseg.data import IGNORE_INDEX, build_val_dataset
from kaseg.engine.metrics import confusion_matrix, segmentation_metrics
from kaseg.stages import load_segmenter


def coarse_predictions(
    masks: torch.Tensor, num_classes: int, stride: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max predictions (B x H x W) of the stride-``stride`` logit grids for ``masks``:
    the area average of the one-hot labels, and the grid fitted for ``steps`` Adam steps."""
    height, width = masks.shape[-2:]
    valid = (masks != IGNORE_INDEX).unsqueeze(1)
    one_hot = F.one_hot(torch.where(valid[:, 0], masks, 0), num_classes).permute(0, 3, 1, 2).float()
    grid = (-(-height // stride), -(-width // stride))
    average = F.adaptive_avg_pool2d(one_hot * valid, grid)

    def upsample(logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)

    logits = average.clamp(min=1e-3).log().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(upsample(logits), masks, ignore_index=IGNORE_INDEX).backward()
        optimizer.step()
    return upsample(average).argmax(1), upsample(logits.detach()).argmax(1)


@torch.no_grad()
def predictions_of(path: str, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Arg-max predictions of the checkpoint's model on ``images`` (normalised, B x 3 x H x W)."""
    model = load_segmenter(path, num_classes=num_classes)
    return torch.cat([model(batch)["logits"].argmax(1) for batch in images.split(50)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per grid")
    parser.add_argument("--checkpoint", action="append", default=[], help="also fit grids to this model's predictions")
    args = parser.parse_args()
    config = load_config(args.config)
    dataset = build_val_dataset(config.data)  # read once: the masks, and the images the models see
    names = list(dataset.dataset.classes)
    samples = [dataset[index] for index in range(len(dataset))]
    if len({tuple(mask.shape) for _, mask in samples}) != 1:
        raise SystemExit("grid_oracle.py needs a split whose masks all have one size (e.g. shapes)")
    images = torch.stack([image for image, _ in samples])
    masks = torch.stack([mask.as_subclass(torch.Tensor).long() for _, mask in samples])
    targets = {"ground truth": masks}
    targets.update({path: predictions_of(path, images, len(names)) for path in args.checkpoint})
    rows = {}
    for stride in args.strides:
        rows[stride] = {}
        for name, target in targets.items():
            matrices = [torch.zeros(len(names), len(names), dtype=torch.long) for _ in range(2)]
            for batch, truth in zip(target.split(100), masks.split(100)):
                for matrix, prediction in zip(matrices, coarse_predictions(batch, len(names), stride, args.steps)):
                    matrix += confusion_matrix(prediction, truth, len(names))
            average, fitted = (segmentation_metrics(m, names) for m in matrices)
            rows[stride][name] = {"area_average": average["miou"], "fitted": fitted["miou"], "iou": fitted["iou"]}
    print(json.dumps(rows, indent=2))
    print("mIoU against the ground truth of grids fitted to (area average / fitted):")
    print("| output stride | " + " | ".join(targets) + " |")
    for stride, row in rows.items():
        cells = [f"{row[name]['area_average']:.1f} / {row[name]['fitted']:.1f}" for name in targets]
        print(f"| {stride} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
