"""The quick demo end to end: every stage, the table, the JSON rows, diagnostics and the report."""

from __future__ import annotations

import json

import pytest

from kaseg.cli import main
from kaseg.tools.demo import SHIPPED_TEACHER, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_demo_end_to_end(tmp_path, capsys):
    """From the shipped teacher, as users start."""
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True)
    assert summary["teacher"] == "shipped" and summary["rows"][0]["checkpoint"] == str(SHIPPED_TEACHER)
    check_summary(out, summary, runs=3)

    # A second run reuses every finished stage and prints the same table as JSON.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")}
    capsys.readouterr()
    main(["demo", "--quick", "--out", str(out), "--json"])
    rows_again = json.loads(capsys.readouterr().out)
    assert [r["miou"] for r in rows_again] == [r["miou"] for r in summary["rows"]]
    assert {"model", "params", "gflops", "latency_ms", "miou"} <= set(rows_again[0])
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")}


@pytest.mark.slow
def test_quick_demo_training_its_own_teacher(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True, train_teacher=True)
    assert summary["teacher"] == "trained"
    assert summary["rows"][0]["checkpoint"] == str(out / "teacher" / "checkpoints" / "last.pt")
    check_summary(out, summary, runs=4)


def check_summary(out, summary, runs):
    rows = summary["rows"]
    assert [row["run"] for row in rows] == ["teacher", "student", "distill"]
    assert rows[0]["architecture"] == "deeplabv3plus_resnet18"
    assert rows[1]["architecture"] == rows[2]["architecture"] == "deeplabv3_mobilenetv2"
    for row in rows:
        assert isinstance(row["miou"], float) and 0 <= row["miou"] <= 100
        assert row["params"] > 0 and row["gflops"] > 0 and row["latency_ms"] > 0 and row["latency_path"]
    assert rows[0]["gflops"] > 10 * rows[1]["gflops"]
    assert summary["gain_miou"] == pytest.approx(rows[2]["miou"] - rows[1]["miou"])
    diagnosis = summary["diagnosis"]
    assert [run["name"] for run in diagnosis["runs"]] == ["student", "distill"]
    assert diagnosis["headroom"]["stride"] == 16 and diagnosis["notes"]
    for name in ("report.html", "per_class_iou.png", "curves.png", "samples.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.html").read_text()
    assert "samples.png" in report and "student + KA + affinity" in report and "Transferable headroom" in report
    assert len(list(out.glob("*/checkpoints/last.pt"))) == runs


def test_full_demo_schedule(tmp_path):
    from kaseg.tools.demo import DEMO_ITERATIONS, demo_stages, stage_config

    configs = {stage.name: stage_config(stage, tmp_path, quick=False, seed=3)
               for stage in demo_stages(tmp_path, compare=True, train_teacher=True)}
    assert configs["teacher"].train.iterations == 4000  # the shipped teacher's own schedule
    assert configs["autoencoder"].train.iterations == DEMO_ITERATIONS["autoencoder"]
    students = [name for name in configs if name not in ("teacher", "autoencoder")]
    assert "compare-kd" in students
    # Every student (alone, distilled, compared) trains on one schedule from one seed.
    assert {configs[name].train.iterations for name in students} == {DEMO_ITERATIONS["student"]}
    assert {configs[name].seed for name in configs} == {3}


def test_full_demo_keeps_the_configs_schedule(tmp_path):
    from kaseg.config import load_config
    from kaseg.tools.demo import CONFIGS, demo_stages, stage_config

    for stage in demo_stages(tmp_path, compare=False):
        config = stage_config(stage, tmp_path, quick=False, seed=0, full=True)
        assert config.train.iterations == load_config(CONFIGS / stage.config_file).train.iterations
