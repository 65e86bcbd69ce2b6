"""A static HTML report of a demo run: table, per-class IoU, training curves and samples.

Everything is written beside ``report.html`` (PNG pictures made with matplotlib), so the
folder can be opened offline or copied as a whole.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kaseg.config import Config
from kaseg.data import build_val_dataset
from kaseg.engine.logger import read_metrics
from kaseg.engine.visualize import denormalize, grid, overlay
from kaseg.stages import load_segmenter


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the report needs matplotlib: pip install 'kaseg[report]'") from error
    return plt


def per_class_chart(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    classes = list(rows[0]["iou"])
    width = 0.8 / len(rows)
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(classes)), 3.6))
    for i, row in enumerate(rows):
        values = [row["iou"][name] or 0.0 for name in classes]
        axis.bar(np.arange(len(classes)) + (i - (len(rows) - 1) / 2) * width, values, width, label=row["model"])
    axis.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right")
    axis.set_ylabel("IoU (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=7, loc="lower left")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def curves_chart(runs: dict[str, Path], path: Path) -> None:
    plt = pyplot()
    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, run_dir in runs.items():
        entries = read_metrics(run_dir)
        train = [e for e in entries if e["split"] == "train"]
        val = [e for e in entries if e["split"] == "val" and e.get("miou") is not None]
        if train:
            loss_axis.plot([e["iteration"] for e in train], [e["loss"] for e in train], label=label)
        if val:
            miou_axis.plot([e["iteration"] for e in val], [e["miou"] for e in val], "o-", label=label)
    loss_axis.set_yscale("log")
    loss_axis.set_title("training loss (sum of weighted terms)")
    miou_axis.set_title("validation mIoU (%)")
    save_over_iterations(figure, (loss_axis, miou_axis), path, legend_size=7, dpi=110)


def save_over_iterations(figure, axes, path: Path, legend_size: int = 8, dpi: int = 100) -> None:
    """Labels ``axes`` (curves over training iterations), saves ``figure`` to ``path`` and closes it."""
    for axis in axes:
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=legend_size)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


@torch.no_grad()
def samples_picture(config: Config, checkpoints: list[Path], count: int, path: Path) -> None:
    """Rows of image | ground truth | each model's prediction, as colour overlays."""
    dataset = build_val_dataset(config.data)
    palette = dataset.dataset.palette
    models = [load_segmenter(checkpoint).float() for checkpoint in checkpoints]
    rows = []
    for index in range(min(count, len(dataset))):
        image, mask = dataset[index]
        pixels = denormalize(image, config.data.mean, config.data.std)
        row = [pixels, overlay(pixels, mask.numpy(), palette)]
        for model in models:
            prediction = model(image[None])["logits"].argmax(1)[0].numpy()
            row.append(overlay(pixels, prediction, palette))
        rows.append(row)
    picture = grid(rows)
    scale = max(1, 512 // picture.shape[1] + 1) if picture.shape[1] < 512 else 1
    Image.fromarray(picture).resize(
        (picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST
    ).save(path)


def diagnosis_html(diagnosis: dict[str, Any]) -> str:
    """The diagnostics section: train vs val mIoU per run, the headroom and the notes."""
    rows = "".join(
        f"<tr><td>{html.escape(run['name'])}</td><td>{run['train_miou']:.2f}</td><td>{run['val_miou']:.2f}</td>"
        f"<td>{run['gap']:+.2f}</td><td>{ {True: 'yes', False: 'no', None: '-'}[run['still_rising']] }</td></tr>"
        for run in diagnosis["runs"]
    )
    headroom = diagnosis.get("headroom")
    headroom_text = ""
    if headroom is not None:
        headroom_text = (
            f"<p>Transferable headroom at the student's stride ({headroom['stride']}): a logit grid fitted to "
            f"the teacher's predictions scores <b>{headroom['teacher_grid_miou']:.2f}</b> mIoU, one fitted to the "
            f"ground truth {headroom['ground_truth_grid_miou']:.2f} (the stride's ceiling); the teacher itself "
            f"{diagnosis['teacher']['val_miou']:.2f}.</p>"
        )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in diagnosis["notes"])
    return f"""<h2>Diagnostics: did distillation pay, and why</h2>
<table><tr><th>run</th><th>train mIoU</th><th>val mIoU</th><th>gap</th><th>still rising</th></tr>
{rows}</table>
<p>Train and validation mIoU on {diagnosis['train_images']} and {diagnosis['val_images']} images of each split
(evaluation transform). No gap means the student underfits: distillation targets help a student generalise,
they add neither capacity nor steps.</p>
{headroom_text}<ul>{notes}</ul>"""


def write_report(out: Path, summary: dict[str, Any], configs: dict[str, Config], samples: int = 6) -> Path:
    """Writes report.html and its PNGs into ``out``; returns the HTML path."""
    rows = summary["rows"]
    per_class_chart(rows, out / "per_class_iou.png")
    curves_chart({name: config.run_dir for name, config in configs.items()}, out / "curves.png")
    checkpoints = [Path(row["checkpoint"]) for row in rows]
    first = configs[next(row["run"] for row in rows if row["run"] in configs)]
    samples_picture(first, checkpoints, samples, out / "samples.png")

    dataset = build_val_dataset(first.data).dataset
    legend = "".join(
        f'<span class="swatch" style="background: rgb{tuple(int(c) for c in colour)}"></span>'
        f"{html.escape(name)} "
        for name, colour in zip(dataset.classes, dataset.palette)
    )
    gains = {run: f"{gain:+.2f}" for run, gain in summary["gains"].items()}
    table_rows = "".join(
        f"<tr><td>{html.escape(row['model'])}</td><td>{row['output_stride']}</td>"
        f"<td>{row['params'] / 1e6:.2f} M</td><td>{row['gflops']:.3f}</td>"
        f"<td>{row['latency_ms']:.1f}</td><td>{row['miou']:.2f}</td><td>{gains.get(row['run'], '')}</td></tr>"
        for row in rows
    )
    columns = " | ".join(["image", "ground truth"] + [html.escape(row["model"]) for row in rows])
    ae = summary["autoencoder"]
    size = "x".join(str(s) for s in summary["input_size"])
    paths = ", ".join(sorted({row["latency_path"] for row in rows if row.get("latency_path")})) or "PyTorch eager"
    reconstruction = (
        f"; the teacher's mIoU when its classifier reads the reconstruction: "
        f"{ae['teacher_miou_through_reconstruction']:.2f}"
        if ae.get("teacher_miou_through_reconstruction") is not None else ""
    )
    diagnostics = diagnosis_html(summary["diagnosis"]) if summary.get("diagnosis") else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kaseg demo report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; border: 1px solid #888; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>kaseg demo: knowledge adaptation on the built-in mosaic benchmark</h1>
<p>Seed {summary['seed']}{' (quick run)' if summary['quick'] else ''}; teacher {summary['teacher']};
total time {summary['seconds'] / 60:.1f} min.</p>
<h2>Models</h2>
<table><tr><th>model</th><th>OS</th><th>params</th><th>GFLOPs @ {size}</th><th>CPU ms @ {size}</th><th>mIoU</th>
<th>vs student alone</th></tr>
{table_rows}</table>
<p>Every student starts from the same weights and sees the same data, so each gain is a paired difference.
Auto-encoder: relative reconstruction error {ae['relative_error']:.3f}{reconstruction}.
GFLOPs count a multiply-add as 2 FLOPs; latency is the median of batch-1 CPU runs on the fastest installed
path ({html.escape(paths)}).</p>
{diagnostics}
<h2>Per-class IoU</h2><img src="per_class_iou.png" alt="per-class IoU">
<h2>Training curves</h2><img src="curves.png" alt="training curves">
<h2>Validation samples</h2>
<p>Columns: {columns}.</p>
<p>{legend}</p>
<img src="samples.png" alt="validation samples">
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
