"""The training loop: exact resume after SIGKILL, atomic checkpoints, non-finite losses,
checkpoint mismatches and 2-process gloo training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_STUDENT, run_kaseg, tiny_config, write_config

from kaseg.config import load_config
from kaseg.data import build_train_dataset
from kaseg.engine import checkpoint as checkpoint_module
from kaseg.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from kaseg.engine.trainer import NonFiniteLossError, TrainingJob, fit
from kaseg.models import build_model
from kaseg.stages import SupervisedTraining, train_segmenter


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), key


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    iterations = 40
    settings = dict(
        train={"iterations": iterations, "eval_every": 15},
        data={"batch_size": 8, "workers": 1},
        model={**TINY_STUDENT, "dropout": 0.1},  # dropout: the torch RNG state must resume too
    )
    straight = write_config(tmp_path / "straight.yaml", tiny_config(tmp_path, "straight", **settings))
    killed = write_config(tmp_path / "killed.yaml", tiny_config(tmp_path, "killed", **settings))
    run_kaseg("train", "--config", str(straight))

    metrics_log = tmp_path / "killed" / "metrics.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "kaseg.cli", "train", "--config", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
    )
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        lines = metrics_log.read_text().splitlines() if metrics_log.exists() else []
        if sum('"train"' in line for line in lines) >= 8:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["iteration"]
    assert 0 < killed_at < iterations, "the run finished before it was killed; make it longer"

    run_kaseg("train", "--config", str(killed), "--resume")
    resumed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    reference = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert resumed["iteration"] == reference["iteration"] == iterations
    assert resumed["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"] == iterations
    assert_same_weights(resumed["model"], reference["model"])
    for a, b in zip(resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_resume_restores_iteration_schedule_and_learning_rate(tmp_path):
    config = load_config(None, [])
    raw = tiny_config(tmp_path, "partial", train={"iterations": 4})
    path = write_config(tmp_path / "c.yaml", raw)
    train_segmenter(load_config(path), progress=False)
    longer = load_config(path, ["train.iterations=4", "train.resume=auto"])
    state = load_checkpoint(longer.run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == 4 and state["scheduler"]["last_epoch"] == 4
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    # Resuming a finished run trains nothing more and returns its last metrics.
    metrics = train_segmenter(longer, progress=False)
    assert load_checkpoint(longer.run_dir / "checkpoints" / "last.pt")["iteration"] == 4
    assert metrics and "miou" in metrics
    assert config.train.resume is None


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.iterations=6", "train.iterations 4 -> 6"), ("train.lr=0.5", "train.lr"), ("seed=7", "seed 0 -> 7"),
     ("data.batch_size=3", "data.batch_size")],
)
def test_resuming_with_another_schedule_is_refused(tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "short", train={"iterations": 4}))
    train_segmenter(load_config(path), progress=False)
    before = load_checkpoint(tmp_path / "short" / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=f"config changed since that run .*{message}"):
        train_segmenter(load_config(path, ["train.resume=auto", override]), progress=False)
    after = load_checkpoint(tmp_path / "short" / "checkpoints" / "last.pt")
    assert after["iteration"] == before["iteration"]  # nothing was trained or overwritten


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "once", train={"iterations": 1}))
    train_segmenter(load_config(path), progress=False)
    with pytest.raises(FileExistsError, match="already holds last.pt"):
        train_segmenter(load_config(path), progress=False)


class NaNAtIteration(torch.nn.Module):
    """Cross-entropy plus a term that turns NaN at one iteration."""

    def __init__(self, model: torch.nn.Module, bad_iteration: int) -> None:
        super().__init__()
        self.inner = SupervisedTraining(model)
        self.bad_iteration = bad_iteration
        self.calls = 0

    def forward(self, images, masks):
        self.calls += 1
        losses = self.inner(images, masks)
        bad = torch.tensor(float("nan") if self.calls == self.bad_iteration else 0.0)
        return {**losses, "adapt": bad}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "nan")))
    torch.manual_seed(0)
    model = build_model(num_classes=8, **TINY_STUDENT)
    job = TrainingJob(
        module=NaNAtIteration(model, bad_iteration=3), trainable=model, export=model,
        evaluate=lambda: {"miou": 0.0},
    )
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: adapt=nan"):
        fit(job, config, train_dataset=build_train_dataset(config.data), device=torch.device("cpu"), progress=False)
    state = load_checkpoint(config.run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"arch": {"name": "x"}, "model": {"w": torch.ones(3)}}, path)
    original = path.read_bytes()

    def crashing_save(state, file):
        file.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"arch": {"name": "x"}, "model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_saved_files_get_ordinary_permissions(tmp_path):
    path = tmp_path / "last.pt"
    previous = os.umask(0o022)
    try:
        save_checkpoint({"arch": {"name": "x"}, "model": {"w": torch.ones(3)}}, path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_loading_into_another_architecture_names_both(tmp_path):
    small = build_model("deeplabv3_mobilenetv2", num_classes=8, width=0.35, head_channels=8)
    path = tmp_path / "small.pt"
    save_checkpoint({"arch": small.arch, "model": small.state_dict()}, path)
    other_classes = build_model("deeplabv3_mobilenetv2", num_classes=5, width=0.35, head_channels=8)
    expected = r"deeplabv3_mobilenetv2\(num_classes=8.*num_classes: checkpoint has 8, model has 5"
    with pytest.raises(CheckpointError, match=expected):
        load_weights(other_classes, path)
    other_arch = build_model("deeplabv3plus_resnet18", num_classes=8, head_channels=8)
    with pytest.raises(CheckpointError, match="deeplabv3plus_resnet18"):
        load_weights(other_arch, path)
    load_weights(build_model("deeplabv3_mobilenetv2", num_classes=8, width=0.35, head_channels=8), path)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # No scale jitter: no padding, so every rank averages the loss over the same pixel count.
    # Training this tiny net is chaotic (float noise grows ~10x per step), so the runs are
    # short; measured: 1.6e-4 max difference with SyncBatchNorm, 1e-2 without.
    common = dict(
        train={"iterations": 2, "sync_bn": True, "lr": 0.002},
        data={"scale_range": [1.0, 1.0], "crop_size": [64, 64],
              "options": {"num_images": 32, "num_val_images": 7, "size": 64}},
    )
    single = tiny_config(tmp_path, "single", **common)
    single["data"]["batch_size"] = 8
    double = tiny_config(tmp_path, "double", **common)  # 2 processes x batch 4
    run_kaseg("train", "--config", str(write_config(tmp_path / "single.yaml", single)))
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "kaseg.cli", "train", "--config", str(write_config(tmp_path / "double.yaml", double)),
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert_same_weights(
        final_weights(tmp_path / "double"), final_weights(tmp_path / "single"), rtol=0, atol=1e-3
    )
    # Evaluation counts each of the 7 validation images once across the 2 ranks.
    logs = [json.loads(line) for line in (tmp_path / "double" / "metrics.jsonl").read_text().splitlines()]
    validation = [entry for entry in logs if entry["split"] == "val"][-1]
    assert validation["pixels"] == 7 * 64 * 64
    single_logs = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in single_logs if e["split"] == "val"][-1]["pixels"] == 7 * 64 * 64


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from kaseg.engine.trainer import _rng_state, _set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint({"arch": {}, "model": {}, "rng": _rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # raises if any entry needs unpickling code
    _set_rng_state(state["rng"])
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_training_state_of_every_optimizer_and_scaler_reads_weights_only(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, "adamw", train={"iterations": 2, "optimizer": "adamw", "warmup_iterations": 1, "grad_clip": 1.0},
    ))
    train_segmenter(load_config(path), progress=False)
    state = torch.load(tmp_path / "adamw" / "checkpoints" / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "metrics"} <= state.keys()
    assert all("exp_avg" in s for s in state["optimizer"]["state"].values())
    # The fp16 grad scaler's state (the trainer enables it on CUDA only; its state has the same types).
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(weight.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    save_checkpoint({"arch": {}, "model": {}, "scaler": scaler.state_dict()}, tmp_path / "scaler.pt")
    assert load_checkpoint(tmp_path / "scaler.pt")["scaler"] == scaler.state_dict()


# Layers, bottom to top; a module may import its own layer and the ones below it.
LAYERS = (
    ("kaseg.registry", "kaseg.config"),
    ("kaseg.data", "kaseg.models", "kaseg.distill", "kaseg.engine"),
    ("kaseg.stages",),
    ("kaseg.tools", "kaseg.cli"),
)
# The one exception: validate_config (run by load_config) asks the registries of models,
# data sets and losses whether the names in a config exist, inside the function.
UPWARD_ALLOWED = {("kaseg.config", "kaseg.data"), ("kaseg.config", "kaseg.models"), ("kaseg.config", "kaseg.distill")}


def _layer(module: str) -> tuple[int, str] | None:
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return index, name
    return None


def test_no_module_imports_a_layer_above_its_own():
    import ast

    upward = []
    for path in sorted((REPO / "kaseg").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                source, destination = _layer(module), _layer(target)
                if source and destination and destination[0] > source[0]:
                    if (source[1], destination[1]) not in UPWARD_ALLOWED:
                        upward.append(f"{module} imports {target} (line {node.lineno})")
    assert not upward
