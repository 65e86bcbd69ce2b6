"""The README's evidence: every distillation method on the built-in benchmark, under one protocol.

    python scripts/evidence.py magnitudes            # first-step loss values (base weights)
    python scripts/evidence.py tune                  # development seed(s): every method x multiplier
    python scripts/evidence.py select                # keep each method's best multiplier
    python scripts/evidence.py confirm               # confirmation seeds, nothing changed
    python scripts/evidence.py table                 # the README tables

The protocol (methods, base weights, multipliers, seeds) is
``evidence/mosaic/protocol.yaml``. Every run is a normal kaseg run folder under
``--runs`` (default ``runs/evidence``), reused when finished and resumed when
interrupted; its result is written to ``--results`` (default ``evidence/mosaic``, kept in
the repository), so a later session continues where an earlier one stopped. All runs of a
seed are paired: the student alone and every distilled student start from the same
weights and see the same batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from kaseg.config import Config, load_config
from kaseg.distill.teacher import TeacherFeatureStore
from kaseg.engine.logger import read_metrics
from kaseg.stages import distill, evaluate_checkpoint, train_autoencoder, train_segmenter
from kaseg.tools.demo import CONFIGS, SHIPPED_TEACHER, finished_metrics

PROTOCOL = Path(__file__).resolve().parents[1] / "evidence" / "mosaic" / "protocol.yaml"


def read_protocol(path: Path = PROTOCOL) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def scaled_losses(method: dict[str, Any], multiplier: float) -> list[dict[str, Any]]:
    return [{**loss, "weight": loss["weight"] * multiplier} for loss in method["losses"]]


def _flow(value: Any) -> str:
    """A YAML flow value for a command-line override."""
    return yaml.safe_dump(value, default_flow_style=True).strip()


def config_for(stage: str, seed: int, runs: Path, name: str, extra: list[str] = ()) -> Config:
    overrides = [
        f"output_dir={runs / f'seed{seed}'}",
        f"name={name}",
        f"seed={seed}",
        "train.resume=auto",
        f"teacher.checkpoint={SHIPPED_TEACHER}",
        f"autoencoder.checkpoint={runs / f'seed{seed}' / 'autoencoder' / 'checkpoints' / 'last.pt'}",
    ]
    return load_config(CONFIGS / stage, overrides + list(extra))


def method_config(seed: int, runs: Path, name: str, method: dict[str, Any], multiplier: float) -> Config:
    return config_for("distill.yaml", seed, runs, name, [
        f"distill.losses={_flow(scaled_losses(method, multiplier))}",
        f"distill.autoencoder={str(bool(method.get('autoencoder', False))).lower()}",
    ])


def run(config: Config, stage, results: Path, record: dict[str, Any], test_split: bool) -> dict[str, Any]:
    """Trains (or reuses) one run and writes its result JSON; returns the result."""
    path = results / f"seed{config.seed}" / f"{config.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    metrics = finished_metrics(config) or stage(config)
    checkpoint = config.run_dir / "checkpoints" / "last.pt"
    result = {
        **record,
        "run": config.name,
        "seed": config.seed,
        "val": {"miou": metrics["miou"], "iou": metrics["iou"]},
        "curve": [(e["iteration"], e["miou"]) for e in read_metrics(config.run_dir)
                  if e.get("split") == "val" and e.get("miou") is not None],
        "iterations": config.train.iterations,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    if test_split:
        import dataclasses

        test_config = dataclasses.replace(config, data=dataclasses.replace(config.data, val_split="test"))
        test = evaluate_checkpoint(test_config, checkpoint)
        result["test"] = {"miou": test["miou"], "iou": test["iou"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def run_seed(seed: int, plan: dict[str, float], protocol: dict[str, Any], runs: Path, results: Path,
             test_split: bool, store: TeacherFeatureStore | None) -> list[dict[str, Any]]:
    """The student alone, the auto-encoder and every (method, multiplier) of ``plan`` for one seed
    (every stage reading the shipped teacher shares ``store``)."""
    done = [run(config_for("student.yaml", seed, runs, "alone"), train_segmenter, results,
                {"method": "alone", "multiplier": None, "losses": []}, test_split)]
    autoencoder = config_for("autoencoder.yaml", seed, runs, "autoencoder")
    if finished_metrics(autoencoder) is None:
        train_autoencoder(autoencoder, teacher_store=store)
    for key, multipliers in plan.items():
        method = protocol["methods"][key]
        for multiplier in multipliers:
            name = f"{key}-x{multiplier:g}"
            done.append(run(method_config(seed, runs, name, method, multiplier),
                            partial(distill, teacher_store=store), results,
                            {"method": key, "multiplier": multiplier,
                             "losses": scaled_losses(method, multiplier)}, test_split))
    return done


def load_results(results: Path, seeds: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    found = {}
    for seed in seeds:
        folder = results / f"seed{seed}"
        found[seed] = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return found


def select(protocol: dict[str, Any], results: Path) -> dict[str, float]:
    """Each method's multiplier with the best mean validation mIoU over the development seeds."""
    by_seed = load_results(results, protocol["development_seeds"])
    chosen = {}
    for key in protocol["methods"]:
        scores = {}
        for multiplier in protocol["multipliers"]:
            values = [runs.get(f"{key}-x{multiplier:g}", {}).get("val", {}).get("miou") for runs in by_seed.values()]
            if None in values:
                raise SystemExit(f"method {key} x{multiplier:g} is missing on a development seed; run `tune` first")
            scores[multiplier] = statistics.mean(values)
        chosen[key] = max(scores, key=scores.get)
    return chosen


def table(protocol: dict[str, Any], results: Path, split: str) -> str:
    """Markdown: every confirmation run's mIoU, and the paired gain over the student alone."""
    chosen = json.loads((results / "selected.json").read_text())
    seeds = protocol["confirmation_seeds"]
    by_seed = load_results(results, seeds)
    lines = [
        f"| method (kept multiplier) | {split} mIoU mean ± std | paired gain mean (min..max) | per seed |",
        "|---|---|---|---|",
    ]
    names = ["alone"] + [f"{key}-x{chosen[key]:g}" for key in protocol["methods"]]
    for name in names:
        if any(name not in runs or split not in runs[name] for runs in by_seed.values()):
            lines.append(f"| {name} | (missing on some seed) | | |")
            continue
        values = [runs[name][split]["miou"] for runs in by_seed.values()]
        gains = [runs[name][split]["miou"] - runs["alone"][split]["miou"] for runs in by_seed.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{seed}: {value:.2f} ({gain:+.2f})" for seed, value, gain in zip(seeds, values, gains))
        lines.append(
            f"| {name} | {statistics.mean(values):.2f} ± {spread:.2f} | "
            f"{statistics.mean(gains):+.2f} ({min(gains):+.2f}..{max(gains):+.2f}) | {per_seed} |"
        )
    return "\n".join(lines)


def tuning_table(protocol: dict[str, Any], results: Path) -> str:
    by_seed = load_results(results, protocol["development_seeds"])
    multipliers = protocol["multipliers"]
    lines = ["| method | " + " | ".join(f"x{m:g}" for m in multipliers) + " |", "|---|" + "---|" * len(multipliers)]
    for key in ["alone", *protocol["methods"]]:
        cells = []
        for multiplier in ([None] if key == "alone" else multipliers):
            name = "alone" if key == "alone" else f"{key}-x{multiplier:g}"
            values = [runs[name]["val"]["miou"] for runs in by_seed.values() if name in runs]
            cells.append(", ".join(f"{v:.2f}" for v in values) or "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def magnitudes(protocol: dict[str, Any], runs: Path, seed: int) -> dict[str, dict[str, float]]:
    """Each method's loss terms at weight 1 on the first training batch of ``seed``, from the
    student's initial weights (the auto-encoder of that seed must be trained): what the base
    weights of the protocol are derived from."""
    from kaseg.data import build_train_dataset
    from kaseg.data.loader import train_loader
    from kaseg.distill import Distiller, FeatureDims, build_losses
    from kaseg.distill.autoencoder import stride_ratio_layers
    from kaseg.stages import build_student, load_autoencoder, load_segmenter

    found = {}
    for key, method in protocol["methods"].items():
        config = method_config(seed, runs, key, method, 1.0)
        dataset = build_train_dataset(config.data)
        images, masks = next(iter(train_loader(dataset, batch_size=config.data.batch_size, seed=seed,
                                               start_iteration=0, workers=0)))
        teacher = load_segmenter(config.teacher.checkpoint, num_classes=len(dataset.dataset.classes)).float()
        student = build_student(config, len(dataset.dataset.classes))
        encoder, code = None, teacher.feature_channels
        if config.distill.autoencoder:
            layers = stride_ratio_layers(teacher.feature_stride, student.feature_stride)
            encoder = load_autoencoder(config.autoencoder.checkpoint, teacher, config.autoencoder.code_channels, layers)
            code = config.autoencoder.code_channels
        dims = FeatureDims(student.feature_channels, teacher.feature_channels, code, len(dataset.dataset.classes))
        unweighted = [{**loss, "weight": 1.0} for loss in method["losses"]]
        distiller = Distiller(teacher, student, encoder=encoder, losses=build_losses(unweighted, dims)).train()
        with torch.no_grad():
            found[key] = {name: float(value) for name, value in distiller(images, masks).items()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["magnitudes", "tune", "select", "confirm", "table"])
    parser.add_argument("--runs", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--results", type=Path, default=Path("evidence/mosaic"))
    parser.add_argument("--seeds", type=int, nargs="+", help="override the protocol's seeds for this step")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all of the protocol)")
    parser.add_argument("--multipliers", type=float, nargs="+",
                        help="tune: only these of the protocol's multipliers (to split the work)")
    args = parser.parse_args()
    if args.multipliers and args.step != "tune":
        parser.error(f"--multipliers only applies to tune (the {args.step} step takes the protocol's choices)")
    protocol = read_protocol()
    schedule = load_config(CONFIGS / "student.yaml").train.iterations
    if protocol.get("iterations") != schedule:
        parser.error(f"the protocol's iterations ({protocol.get('iterations')}) differ from "
                     f"kaseg/configs/mosaic/student.yaml's ({schedule}): its results would not compare")
    methods = args.methods or list(protocol["methods"])
    cache_mb = load_config(CONFIGS / "distill.yaml").teacher.cache_mb
    store = TeacherFeatureStore(cache_mb) if cache_mb > 0 else None
    if args.step == "magnitudes":
        seed = (args.seeds or protocol["development_seeds"])[0]
        print(json.dumps(magnitudes(protocol, args.runs, seed), indent=2))
    elif args.step == "tune":
        unknown = sorted(set(args.multipliers or []) - set(protocol["multipliers"]))
        if unknown:
            parser.error(f"--multipliers {unknown} are not in the protocol's {protocol['multipliers']}")
        plan = {key: args.multipliers or protocol["multipliers"] for key in methods}
        for seed in args.seeds or protocol["development_seeds"]:
            run_seed(seed, plan, protocol, args.runs, args.results, test_split=False, store=store)
        print(tuning_table(protocol, args.results))
    elif args.step == "select":
        chosen = select(protocol, args.results)
        (args.results / "selected.json").write_text(json.dumps(chosen, indent=2))
        print(json.dumps(chosen, indent=2))
    elif args.step == "confirm":
        chosen = json.loads((args.results / "selected.json").read_text())
        plan = {key: [chosen[key]] for key in methods}
        for seed in args.seeds or protocol["confirmation_seeds"]:
            run_seed(seed, plan, protocol, args.runs, args.results, test_split=True, store=store)
        print(table(protocol, args.results, "test"))
    else:
        print(tuning_table(protocol, args.results))
        for split in ("val", "test"):
            print()
            print(table(protocol, args.results, split))


if __name__ == "__main__":
    main()
