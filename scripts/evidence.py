"""The README's evidence: every distillation method on the built-in benchmark, under one protocol.

    python scripts/evidence.py magnitudes            # first-step loss values (base weights)
    python scripts/evidence.py tune                  # development seed(s): every method x multiplier
    python scripts/evidence.py select                # keep each method's best multiplier
    python scripts/evidence.py confirm               # confirmation seeds, nothing changed
    python scripts/evidence.py table                 # the README tables
    python scripts/evidence.py table --results evidence/mosaic/cpu-check --tuning evidence/mosaic \
        --methods adapt                              # confirmation seeds rerun on another device
    python scripts/evidence.py table --results evidence/mosaic/fresh-check --tuning evidence/mosaic \
        --methods cwd --seeds 6 7 8                  # seeds never looked at, checked later
    python scripts/evidence.py curves --results evidence/mosaic/cpu-check --tuning evidence/mosaic \
        --methods ka-ratio cwd --out curves.png      # validation mIoU over training, paired gain
    python scripts/evidence.py all --parallel 12 --device cuda --deadline 540
                                                     # every missing run, as many at once as
                                                     # the machine holds (a GPU), until a deadline

The protocol (methods, base weights, multipliers, seeds) is
``evidence/mosaic/protocol.yaml``. Every run is a normal kaseg run folder under
``--runs`` (default ``runs/evidence``), reused when finished and resumed when
interrupted; its result is written to ``--results`` (default ``evidence/mosaic``, kept in
the repository), so a later session continues where an earlier one stopped. All runs of a
seed are paired: the student alone and every distilled student start from the same
weights and see the same batches.

``all`` runs every missing run of the protocol as separate processes (``job``), up to
``--parallel`` at a time, most important first: the confirmation of the student alone and
of knowledge adaptation, then the tuning runs, then each method's confirmation runs as soon
as its tuning is complete (its multiplier is selected then). It starts no run that the
slowest finished run says cannot end before ``--deadline``, and stops the runs still going
at the deadline (their folders resume later).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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


def config_for(stage: str, seed: int, runs: Path, name: str, extra: list[str] = (),
               device: str | None = None) -> Config:
    overrides = [
        *([f"train.device={device}"] if device else []),
        f"output_dir={runs / f'seed{seed}'}",
        f"name={name}",
        f"seed={seed}",
        "train.resume=auto",
        f"teacher.checkpoint={SHIPPED_TEACHER}",
        f"autoencoder.checkpoint={runs / f'seed{seed}' / 'autoencoder' / 'checkpoints' / 'last.pt'}",
    ]
    return load_config(CONFIGS / stage, overrides + list(extra))


def method_config(seed: int, runs: Path, name: str, method: dict[str, Any], multiplier: float,
                  device: str | None = None) -> Config:
    return config_for("distill.yaml", seed, runs, name, [
        f"distill.losses={_flow(scaled_losses(method, multiplier))}",
        f"distill.autoencoder={str(bool(method.get('autoencoder', False))).lower()}",
    ], device)


def device_name(config: Config) -> str:
    """What the run trained on, for its result file."""
    from kaseg.engine.distributed import local_device

    device = local_device(config.train.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def run(config: Config, stage, results: Path, record: dict[str, Any], test_split: bool) -> dict[str, Any]:
    """Trains (or reuses) one run and writes its result JSON; returns the result."""
    path = results / f"seed{config.seed}" / f"{config.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    reused = finished_metrics(config)  # a run folder trained earlier (or by `kaseg distill`)
    metrics = reused or stage(config)
    checkpoint = config.run_dir / "checkpoints" / "last.pt"
    result = {
        **record,
        "run": config.name,
        "seed": config.seed,
        "val": {"miou": metrics["miou"], "iou": metrics["iou"]},
        "curve": [(e["iteration"], e["miou"]) for e in read_metrics(config.run_dir)
                  if e.get("split") == "val" and e.get("miou") is not None],
        "iterations": config.train.iterations,
        # Only a run trained here says how long it took and on what.
        "seconds": None if reused else time.perf_counter() - started,
        "threads": None if reused else torch.get_num_threads(),
        "device": None if reused else device_name(config),
    }
    if test_split:
        import dataclasses

        test_config = dataclasses.replace(config, data=dataclasses.replace(config.data, val_split="test"))
        test = evaluate_checkpoint(test_config, checkpoint)
        result["test"] = {"miou": test["miou"], "iou": test["iou"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def train_one(seed: int, key: str, multiplier: float | None, protocol: dict[str, Any], runs: Path,
              results: Path, test_split: bool, store: TeacherFeatureStore | None,
              device: str | None = None) -> dict[str, Any] | None:
    """One run of a seed: ``alone``, ``autoencoder`` (no result file: the auto-encoder is a
    stage of the methods that use it) or a method of the protocol at ``multiplier``."""
    if key == "alone":
        return run(config_for("student.yaml", seed, runs, "alone", device=device), train_segmenter, results,
                   {"method": "alone", "multiplier": None, "losses": []}, test_split)
    if key == "autoencoder":
        autoencoder = config_for("autoencoder.yaml", seed, runs, "autoencoder", device=device)
        if finished_metrics(autoencoder) is None:
            train_autoencoder(autoencoder, teacher_store=store)
        return None
    method = protocol["methods"][key]
    return run(method_config(seed, runs, f"{key}-x{multiplier:g}", method, multiplier, device),
               partial(distill, teacher_store=store), results,
               {"method": key, "multiplier": multiplier, "losses": scaled_losses(method, multiplier)}, test_split)


def run_seed(seed: int, plan: dict[str, list[float]], protocol: dict[str, Any], runs: Path, results: Path,
             test_split: bool, store: TeacherFeatureStore | None, device: str | None = None) -> None:
    """The student alone, the auto-encoder and every (method, multiplier) of ``plan`` for one seed
    (every stage reading the shipped teacher shares ``store``)."""
    common = dict(protocol=protocol, runs=runs, results=results, test_split=test_split, store=store, device=device)
    train_one(seed, "alone", None, **common)
    train_one(seed, "autoencoder", None, **common)
    for key, multipliers in plan.items():
        for multiplier in multipliers:
            train_one(seed, key, multiplier, **common)


def load_results(results: Path, seeds: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    found = {}
    for seed in seeds:
        folder = results / f"seed{seed}"
        found[seed] = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return found


def tuning_scores(protocol: dict[str, Any], results: Path, key: str) -> dict[float, float | None]:
    """``key``'s mean validation mIoU over the development seeds per multiplier (None where
    a tuning run is missing)."""
    by_seed = load_results(results, protocol["development_seeds"])
    scores = {}
    for multiplier in protocol["multipliers"]:
        values = [runs.get(f"{key}-x{multiplier:g}", {}).get("val", {}).get("miou") for runs in by_seed.values()]
        scores[multiplier] = None if None in values else statistics.mean(values)
    return scores


def select_method(protocol: dict[str, Any], results: Path, key: str) -> float | None:
    """``key``'s multiplier with the best mean validation mIoU over the development seeds;
    None while one of its tuning runs is missing."""
    scores = tuning_scores(protocol, results, key)
    return None if None in scores.values() else max(scores, key=scores.get)


def select(protocol: dict[str, Any], results: Path) -> dict[str, float]:
    """Each method's multiplier with the best mean validation mIoU over the development seeds."""
    chosen = {}
    for key in protocol["methods"]:
        scores = tuning_scores(protocol, results, key)
        missing = [multiplier for multiplier, score in scores.items() if score is None]
        if missing:
            raise SystemExit(f"method {key} x{missing[0]:g} is missing on a development seed; run `tune` first")
        chosen[key] = max(scores, key=scores.get)
    return chosen


@dataclass
class Job:
    """One run of ``all``; ``multiplier`` None for a method's confirmation run means
    'the selected one', known once its tuning is complete."""

    seed: int
    key: str  # alone, autoencoder or a method of the protocol
    multiplier: float | None
    test_split: bool
    tier: int  # lower starts first

    def label(self) -> str:
        if self.key in ("alone", "autoencoder"):
            suffix = ""
        else:
            suffix = "-x?" if self.multiplier is None else f"-x{self.multiplier:g}"
        return f"seed{self.seed}/{self.key}{suffix}"


def plan_all(protocol: dict[str, Any], methods: list[str], results: Path, runs: Path) -> list[Job]:
    """Every run of the protocol whose result is missing, most important first: the
    confirmation of the student alone and of knowledge adaptation (tier 0), the tuning runs
    (1), the other methods' confirmation runs (2)."""
    done = load_results(results, protocol["development_seeds"] + protocol["confirmation_seeds"])
    jobs = []
    uses_autoencoder = [key for key in methods if protocol["methods"][key].get("autoencoder")]
    for seed in protocol["development_seeds"]:
        if "alone" not in done[seed]:
            jobs.append(Job(seed, "alone", None, False, 1))
        for key in methods:
            jobs += [Job(seed, key, m, False, 1) for m in protocol["multipliers"] if f"{key}-x{m:g}" not in done[seed]]
    confirmation = [Job(seed, "alone", None, True, 0) for seed in protocol["confirmation_seeds"]
                    if "alone" not in done[seed]]
    for key in methods:  # method by method: a method's seeds complete its row
        chosen = select_method(protocol, results, key)
        confirmation += [Job(seed, key, None, True, 0 if key == "ka" else 2) for seed in protocol["confirmation_seeds"]
                         if chosen is None or f"{key}-x{chosen:g}" not in done[seed]]
    jobs += confirmation
    for seed in sorted({job.seed for job in jobs if job.key in uses_autoencoder}):
        if finished_metrics(config_for("autoencoder.yaml", seed, runs, "autoencoder")) is None:
            jobs.append(Job(seed, "autoencoder", None, False, 0))
    return sorted(jobs, key=lambda job: (job.tier, job.key != "autoencoder"))


def job_command(job: Job, args: argparse.Namespace) -> list[str]:
    """The ``job`` step that trains ``job`` in its own process."""
    command = [sys.executable, __file__, "job", "--seeds", str(job.seed), "--methods", job.key,
               "--runs", str(args.runs), "--results", str(args.results)]
    command += ["--multipliers", f"{job.multiplier:g}"] if job.multiplier is not None else []
    command += ["--test-split"] if job.test_split else []
    return command + (["--device", args.device] if args.device else [])


def run_all(jobs: list[Job], protocol: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Runs ``jobs`` as ``job`` processes, ``args.parallel`` at a time (see the module
    docstring); returns one line per event: what started, finished, failed or was left."""
    started = time.monotonic()
    uses_autoencoder = {key for key, method in protocol["methods"].items() if method.get("autoencoder")}
    pending, running, report = list(jobs), {}, []
    finished_autoencoders = {job.seed for job in jobs} - {j.seed for j in jobs if j.key == "autoencoder"}
    durations: dict[bool, list[float]] = {True: [], False: []}  # keyed by "is an auto-encoder"
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    logs = args.runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def ready(job: Job) -> bool:
        if awaits_autoencoder(job):
            return False
        if job.multiplier is None and job.key not in ("alone", "autoencoder"):
            job.multiplier = select_method(protocol, args.results, job.key)
            return job.multiplier is not None
        return True

    def awaits_autoencoder(job: Job) -> bool:
        return job.key in uses_autoencoder and job.seed not in finished_autoencoders

    def fits(job: Job, left: float) -> bool:
        return max(durations[job.key == "autoencoder"], default=0.0) <= left

    def note(line: str) -> None:
        line = f"[{time.monotonic() - started:6.0f} s] {line}"
        print(line, flush=True)
        report.append(line)

    while True:
        for process, (job, since) in list(running.items()):
            if process.poll() is None:
                continue
            del running[process]
            seconds = time.monotonic() - since
            if process.returncode == 0:
                durations[job.key == "autoencoder"].append(seconds)
                finished_autoencoders |= {job.seed} if job.key == "autoencoder" else set()
                note(f"done {job.label()} in {seconds:.0f} s")
            else:
                log = logs / f"{job.label().replace('/', '_')}.log"
                note(f"FAILED {job.label()} (exit {process.returncode}; log {log})")
                if job.key == "autoencoder":  # its seed's methods that need it cannot run
                    for dependent in [j for j in pending if j.seed == job.seed and awaits_autoencoder(j)]:
                        pending.remove(dependent)
                        note(f"not run {dependent.label()}: its auto-encoder failed")
        left = args.deadline - (time.monotonic() - started) if args.deadline else float("inf")
        if left <= 0:
            for process, (job, _) in running.items():
                process.terminate()
                process.wait()
                note(f"stopped {job.label()} at the deadline (its run folder resumes later)")
            running.clear()
        for job in [j for j in pending if ready(j) and fits(j, left)]:
            # A waiting job of a higher tier (knowledge adaptation waiting for its seed's
            # auto-encoder) keeps its place: lower tiers do not take the last free slots.
            waiting = sum(1 for j in pending if j.tier < job.tier and awaits_autoencoder(j))
            if len(running) + waiting >= args.parallel:
                continue
            pending.remove(job)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            with (logs / f"{job.label().replace('/', '_')}.log").open("w") as log:
                process = subprocess.Popen(job_command(job, args), stdout=log, stderr=subprocess.STDOUT, env=env)
            running[process] = (job, time.monotonic())
            note(f"start {job.label()}")
        if not running:
            break
        time.sleep(1.0)
    for job in pending:
        why = ("no time left before the deadline" if ready(job) else
               "its auto-encoder is missing" if awaits_autoencoder(job)
               else "its tuning is incomplete")
        note(f"not run {job.label()}: {why}")
    return report


def kept_runs(protocol: dict[str, Any], tuning: Path, methods: list[str] | None = None) -> list[str]:
    """Run names of the student alone and of each method at its kept multiplier (read from
    ``tuning``'s selected.json, else selected from its development seeds); a bare method key
    where its tuning is incomplete."""
    selected = tuning / "selected.json"
    chosen = json.loads(selected.read_text()) if selected.is_file() else {}
    names = ["alone"]
    for key in methods or protocol["methods"]:
        multiplier = chosen[key] if key in chosen else select_method(protocol, tuning, key)
        names.append(key if multiplier is None else f"{key}-x{multiplier:g}")
    return names


def paired_curves(by_seed: dict[int, dict[str, dict[str, Any]]], name: str) -> dict[str, list[float]]:
    """``name``'s validation curve over the seeds of ``by_seed``, at the iterations every
    seed and its student alone evaluated: ``steps``, ``mean``, ``seeds`` (one list per seed)
    and the paired gain over the student alone (``gain_mean``, ``gain_min``, ``gain_max``)."""
    per_seed = [dict(runs[name]["curve"]) for runs in by_seed.values()]
    alone = [dict(runs["alone"]["curve"]) for runs in by_seed.values()]
    steps = sorted(set.intersection(*(set(curve) for curve in per_seed + alone)))
    gains = [[curve[step] - reference[step] for curve, reference in zip(per_seed, alone)] for step in steps]
    return {
        "steps": steps,
        "mean": [statistics.mean(curve[step] for curve in per_seed) for step in steps],
        "seeds": [[curve[step] for step in steps] for curve in per_seed],
        "gain_mean": [statistics.mean(gain) for gain in gains],
        "gain_min": [min(gain) for gain in gains],
        "gain_max": [max(gain) for gain in gains],
    }


def curves(protocol: dict[str, Any], results: Path, out: Path, tuning: Path | None = None,
           methods: list[str] | None = None, seeds: list[int] | None = None) -> list[str]:
    """A PNG of validation mIoU over training: left, each run's mean over ``seeds`` (thin
    lines: every seed); right, each method's paired gain over the student alone (mean, and
    the band between the lowest and the highest seed). Returns the runs drawn: those present
    on every seed."""
    from kaseg.tools.report import pyplot, save_over_iterations

    seeds = seeds or protocol["confirmation_seeds"]
    by_seed = load_results(results, seeds)
    names = [name for name in kept_runs(protocol, tuning or results, methods)
             if all(name in runs for runs in by_seed.values())]
    if "alone" not in names:
        raise SystemExit(f"curves: the student alone is missing on some of seeds {seeds} in {results}")
    plt = pyplot()
    figure, (miou_axis, gain_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, name in enumerate(names):
        color, series = f"C{index}", paired_curves(by_seed, name)
        for values in series["seeds"]:
            miou_axis.plot(series["steps"], values, color=color, alpha=0.25, linewidth=0.8)
        miou_axis.plot(series["steps"], series["mean"], color=color, linewidth=2, label=name)
        if name != "alone":
            gain_axis.fill_between(series["steps"], series["gain_min"], series["gain_max"], color=color, alpha=0.15)
            gain_axis.plot(series["steps"], series["gain_mean"], color=color, linewidth=2, label=name)
    gain_axis.axhline(0.0, color="black", linewidth=0.8)
    miou_axis.set_title(f"validation mIoU (%), seeds {', '.join(map(str, seeds))}")
    gain_axis.set_title("paired gain over the student alone (mIoU points)")
    save_over_iterations(figure, (miou_axis, gain_axis), out)
    return names


def table(protocol: dict[str, Any], results: Path, split: str, tuning: Path | None = None,
          methods: list[str] | None = None, seeds: list[int] | None = None) -> str:
    """Markdown: every confirmation run's mIoU, and the paired gain over the student alone.
    Each method's multiplier comes from ``tuning``'s development seeds (default: ``results``;
    another folder where the confirmation seeds were rerun on another device, say); ``seeds``
    replaces the protocol's confirmation seeds (fresh seeds checked later, say)."""
    seeds = seeds or protocol["confirmation_seeds"]
    by_seed = load_results(results, seeds)
    lines = [
        f"| method (kept multiplier) | {split} mIoU mean ± std | paired gain mean (min..max) | per seed |",
        "|---|---|---|---|",
    ]
    for name in kept_runs(protocol, tuning or results, methods):
        if name in protocol["methods"]:
            lines.append(f"| {name} | (tuning incomplete) | | |")
            continue
        if any(name not in runs or split not in runs[name] for runs in by_seed.values()):
            lines.append(f"| {name} | (missing on some seed) | | |")
            continue
        values = [runs[name][split]["miou"] for runs in by_seed.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        if name == "alone":  # the reference: no gain over itself
            per_seed = ", ".join(f"{seed}: {value:.2f}" for seed, value in zip(seeds, values))
            lines.append(f"| {name} | {statistics.mean(values):.2f} ± {spread:.2f} | | {per_seed} |")
            continue
        gains = [runs[name][split]["miou"] - runs["alone"][split]["miou"] for runs in by_seed.values()]
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
    parser.add_argument("step", choices=["magnitudes", "tune", "select", "confirm", "table", "curves", "all", "job"])
    parser.add_argument("--runs", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--results", type=Path, default=Path("evidence/mosaic"))
    parser.add_argument("--seeds", type=int, nargs="+", help="override the protocol's seeds for this step")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all of the protocol)")
    parser.add_argument("--multipliers", type=float, nargs="+",
                        help="tune: only these of the protocol's multipliers (to split the work)")
    parser.add_argument("--device", help="train.device for every run (default: the configs' cpu)")
    parser.add_argument("--parallel", type=int, default=1, help="all: runs at a time")
    parser.add_argument("--deadline", type=float, help="all: seconds after which no run starts or continues")
    parser.add_argument("--test-split", action="store_true", help="job: also score the test split")
    parser.add_argument("--tuning", type=Path,
                        help="table, curves: the results folder whose development seeds choose each method's "
                             "multiplier (default: --results)")
    parser.add_argument("--out", type=Path, help="curves: the PNG to write")
    args = parser.parse_args()
    if args.multipliers and args.step not in ("tune", "job"):
        parser.error(f"--multipliers only applies to tune (the {args.step} step takes the protocol's choices)")
    if args.step != "all" and (args.parallel != 1 or args.deadline is not None):
        parser.error("--parallel and --deadline only apply to all")
    if args.tuning is not None and args.step not in ("table", "curves"):
        parser.error("--tuning only applies to table and curves")
    if args.step == "curves" and args.out is None:
        parser.error("curves needs --out (the PNG to write)")
    if args.step != "curves" and args.out is not None:
        parser.error("--out only applies to curves")
    protocol = read_protocol()
    schedule = load_config(CONFIGS / "student.yaml").train.iterations
    if protocol.get("iterations") != schedule:
        parser.error(f"the protocol's iterations ({protocol.get('iterations')}) differ from "
                     f"kaseg/configs/mosaic/student.yaml's ({schedule}): its results would not compare")
    methods = args.methods or list(protocol["methods"])
    stages = {"alone", "autoencoder"} if args.step == "job" else set()
    unknown = sorted(set(methods) - set(protocol["methods"]) - stages)
    if unknown:
        parser.error(f"--methods {unknown} are not methods of the protocol: {sorted(protocol['methods'])}")
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
            run_seed(seed, plan, protocol, args.runs, args.results, test_split=False, store=store, device=args.device)
        print(tuning_table(protocol, args.results))
    elif args.step == "select":
        chosen = select(protocol, args.results)
        (args.results / "selected.json").write_text(json.dumps(chosen, indent=2))
        print(json.dumps(chosen, indent=2))
    elif args.step == "confirm":
        chosen = json.loads((args.results / "selected.json").read_text())
        plan = {key: [chosen[key]] for key in methods}
        for seed in args.seeds or protocol["confirmation_seeds"]:
            run_seed(seed, plan, protocol, args.runs, args.results, test_split=True, store=store, device=args.device)
        print(table(protocol, args.results, "test"))
    elif args.step == "job":
        if not (args.seeds and len(args.seeds) == 1 and len(methods) == 1 and len(args.multipliers or [None]) == 1):
            parser.error("job takes one --seeds, one --methods and (for a method) one --multipliers")
        multiplier = args.multipliers[0] if args.multipliers else None
        if methods[0] not in ("alone", "autoencoder") and multiplier is None:
            parser.error(f"job: method {methods[0]} needs --multipliers")
        train_one(args.seeds[0], methods[0], multiplier, protocol, args.runs, args.results, args.test_split,
                  store, args.device)
    elif args.step == "all":
        jobs = plan_all(protocol, methods, args.results, args.runs)
        print(f"{len(jobs)} run(s) missing; {args.parallel} at a time on {args.device or 'the configured device'}")
        run_all(jobs, protocol, args)
        try:
            chosen = select(protocol, args.results)
        except SystemExit as incomplete:
            print(f"selection incomplete: {incomplete}")
        else:
            (args.results / "selected.json").write_text(json.dumps(chosen, indent=2))
        print(tuning_table(protocol, args.results))
    elif args.step == "curves":
        drawn = curves(protocol, args.results, args.out, args.tuning, args.methods, args.seeds)
        print(f"{args.out}: {', '.join(drawn)}")
    else:
        print(tuning_table(protocol, args.tuning or args.results))
        for split in ("val", "test"):
            print()
            print(table(protocol, args.results, split, args.tuning, args.methods, args.seeds))


if __name__ == "__main__":
    main()
