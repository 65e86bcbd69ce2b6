"""The quick demo end to end: every stage, the table, the JSON rows and the report."""

from __future__ import annotations

import json

import pytest

from kaseg.cli import main
from kaseg.tools.demo import run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, quick=True)
    rows = summary["rows"]
    assert [row["run"] for row in rows] == ["teacher", "student", "distill"]
    assert rows[0]["architecture"] == "deeplabv3plus_resnet18"
    assert rows[1]["architecture"] == rows[2]["architecture"] == "deeplabv3_mobilenetv2"
    for row in rows:
        assert isinstance(row["miou"], float) and 0 <= row["miou"] <= 100
        assert row["params"] > 0 and row["gflops"] > 0 and row["latency_ms"] > 0
    assert rows[0]["gflops"] > 10 * rows[1]["gflops"]
    for name in ("report.html", "per_class_iou.png", "curves.png", "samples.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.html").read_text()
    assert "samples.png" in report and "student + KA + affinity" in report

    # A second run reuses every finished stage and prints the same table as JSON.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")}
    assert len(stamps) == 4
    capsys.readouterr()
    main(["demo", "--quick", "--out", str(out), "--json"])
    rows_again = json.loads(capsys.readouterr().out)
    assert [r["miou"] for r in rows_again] == [r["miou"] for r in rows]
    assert {"model", "params", "gflops", "latency_ms", "miou"} <= set(rows_again[0])
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.pt")}


def test_every_compare_config_builds_its_losses():
    """The comparison configs `kaseg demo --compare` runs load and build against the
    demo's own models, so a typo in one fails here rather than an hour into the run."""
    from kaseg.config import load_config
    from kaseg.distill.losses import FeatureDims, build_losses
    from kaseg.tools.demo import CONFIGS, demo_stages

    stages = [stage for stage in demo_stages(CONFIGS, compare=True) if stage.name.startswith("compare-")]
    assert len(stages) == len(list((CONFIGS / "compare").glob("*.yaml"))) >= 8
    dims = FeatureDims(student_channels=64, teacher_channels=64, code_channels=64, num_classes=8)
    for stage in stages:
        config = load_config(CONFIGS / stage.config_file)
        assert config.name == f"shapes-{stage.name}", stage.config_file
        assert build_losses(list(config.distill.losses), dims), stage.config_file
