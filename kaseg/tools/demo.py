"""``kaseg demo``: the whole flow on the built-in data set, then a table and a report.

Stages (each a normal run folder under ``out``, reused when finished and resumed when
interrupted): teacher, student alone, auto-encoder, distilled student; with
``compare``, also the comparison methods of ``kaseg/configs/shapes/compare``. Every
model is then measured (parameters, GFLOPs and CPU latency at the demo size) and the
table, the gain of the distilled student and ``report.html`` are written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kaseg.config import Config, load_config
from kaseg.engine.checkpoint import load_checkpoint
from kaseg.stages import distill, load_segmenter, train_autoencoder, train_segmenter
from kaseg.tools.profile import measure_latency, model_profile

logger = logging.getLogger("kaseg")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "shapes"

# Overrides that shrink every stage for `--quick` (the test suite's end-to-end run).
QUICK = [
    "data.options.num_images=128",
    "data.options.num_val_images=32",
    "data.options.size=32",
    "data.crop_size=[32,32]",
    "data.batch_size=8",
    "data.val_batch_size=32",
    "data.workers=0",
    "train.checkpoint_every=10",
]
QUICK_ITERATIONS = {"teacher": 30, "student": 30, "autoencoder": 15, "distill": 30}


@dataclass
class Stage:
    """One training run of the demo."""

    name: str  # run folder name and table label
    config_file: str
    run: Callable[..., dict[str, Any]]
    overrides: list[str] = field(default_factory=list)
    label: str = ""
    in_table: bool = True


def demo_stages(out: Path, compare: bool) -> list[Stage]:
    teacher = f"teacher.checkpoint={out / 'teacher' / 'checkpoints' / 'last.pt'}"
    autoencoder = f"autoencoder.checkpoint={out / 'autoencoder' / 'checkpoints' / 'last.pt'}"
    stages = [
        Stage("teacher", "teacher.yaml", train_segmenter, label="teacher (DeepLabV3+ R18, OS 8)"),
        Stage("student", "student.yaml", train_segmenter, label="student alone (MobileNetV2, OS 16)"),
        Stage("autoencoder", "autoencoder.yaml", train_autoencoder, [teacher], in_table=False),
        Stage("distill", "distill.yaml", distill, [teacher, autoencoder], label="student + KA + affinity"),
    ]
    if compare:
        for path in sorted((CONFIGS / "compare").glob("*.yaml")):
            stages.append(
                Stage(f"compare-{path.stem}", f"compare/{path.name}", distill, [teacher, autoencoder],
                      label=f"student + {path.stem}")
            )
    return stages


def stage_config(stage: Stage, out: Path, quick: bool, seed: int) -> Config:
    overrides = [f"output_dir={out}", f"name={stage.name}", f"seed={seed}", "train.resume=auto"]
    if quick:
        iterations = QUICK_ITERATIONS.get(stage.name, QUICK_ITERATIONS["distill"])
        overrides += QUICK + [f"train.iterations={iterations}"]
    return load_config(CONFIGS / stage.config_file, overrides + stage.overrides)


def run_stage(stage: Stage, config: Config) -> dict[str, Any]:
    """Trains the stage unless its run folder already holds the finished run."""
    last = config.run_dir / "checkpoints" / "last.pt"
    if last.exists():
        state = load_checkpoint(last)
        if state["iteration"] >= config.train.iterations and state.get("metrics"):
            logger.info("%s: finished earlier, reusing %s", stage.name, last)
            return state["metrics"]
    return stage.run(config)


def measure_model(checkpoint: Path, size: tuple[int, int]) -> dict[str, Any]:
    model = load_segmenter(checkpoint).to("cpu")
    profile = model_profile(model, size)
    latency = measure_latency(model, size, warmup=3, runs=20)
    return {**profile, **latency}


def run_demo(
    out: str | Path, *, quick: bool = False, compare: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Runs (or reuses) every stage; writes summary.json and report.html; returns the summary
    (``rows``: one per model, with at least model, params, gflops, latency_ms, miou)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = demo_stages(out, compare)
    results = {}
    for stage in stages:
        config = stage_config(stage, out, quick, seed)
        results[stage.name] = (config, run_stage(stage, config))
    train_seconds = time.perf_counter() - started

    size = tuple(stage_config(stages[0], out, quick, seed).data.crop_size)
    rows = []
    for stage in stages:
        if not stage.in_table:
            continue
        config, metrics = results[stage.name]
        measured = measure_model(config.run_dir / "checkpoints" / "last.pt", size)
        rows.append({
            "model": stage.label,
            "run": stage.name,
            "architecture": load_checkpoint(config.run_dir / "checkpoints" / "last.pt")["arch"]["name"],
            "output_stride": measured["output_stride"],
            "params": measured["params"],
            "gflops": measured["gflops"],
            "latency_ms": measured["latency_ms"],
            "miou": metrics["miou"],
            "iou": metrics["iou"],
        })
    autoencoder_metrics = results["autoencoder"][1]
    summary = {
        "seed": seed,
        "quick": quick,
        "input_size": list(size),
        "rows": rows,
        "autoencoder": {
            "teacher_miou_through_reconstruction": autoencoder_metrics["miou"],
            "relative_error": autoencoder_metrics["relative_error"],
        },
        "gain_miou": _row(rows, "distill")["miou"] - _row(rows, "student")["miou"],
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from kaseg.tools.report import write_report

    summary["report"] = str(write_report(out, summary, {s.name: results[s.name][0] for s in stages}))
    return summary


def _row(rows: list[dict[str, Any]], run: str) -> dict[str, Any]:
    return next(row for row in rows if row["run"] == run)


def format_summary(summary: dict[str, Any]) -> str:
    size = "x".join(str(s) for s in summary["input_size"])
    lines = [
        f"{'model':38s} {'OS':>3s} {'params':>9s} {'GFLOPs':>8s} {'CPU ms':>8s} {'mIoU':>7s}",
        "-" * 78,
    ]
    for row in summary["rows"]:
        lines.append(
            f"{row['model']:38s} {row['output_stride']:3d} {row['params'] / 1e6:8.2f}M "
            f"{row['gflops']:8.3f} {row['latency_ms']:8.1f} {row['miou']:7.2f}"
        )
    ae = summary["autoencoder"]
    lines += [
        "-" * 78,
        f"GFLOPs and CPU latency at {size}, batch 1 (a multiply-add counts as 2 FLOPs).",
        f"auto-encoder: relative reconstruction error {ae['relative_error']:.3f}; teacher mIoU "
        f"through the reconstruction {ae['teacher_miou_through_reconstruction']:.2f}",
        f"distilled student vs student alone: {summary['gain_miou']:+.2f} mIoU",
        f"total time {summary['seconds'] / 60:.1f} min",
    ]
    return "\n".join(lines)
