"""scripts/evidence.py: the protocol's selection and tables on hand-made results."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("evidence", REPO / "scripts" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["evidence"] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


PROTOCOL = {
    "development_seeds": [0],
    "confirmation_seeds": [3, 4],
    "multipliers": [0.5, 1.0],
    "methods": {
        "ka": {"losses": [{"name": "adapt", "weight": 2.0}]},
        "kd": {"losses": [{"name": "kd", "weight": 1.0}]},
    },
}


def write(results, seed, name, **splits):
    folder = results / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({key: {"miou": value} for key, value in splits.items()}))


def test_the_protocol_file_names_every_method_with_a_registered_loss(evidence):
    from kaseg.distill import LOSSES

    protocol = evidence.read_protocol()
    assert set(protocol["development_seeds"]).isdisjoint(protocol["confirmation_seeds"])
    assert len(protocol["multipliers"]) == 3  # the same tuning budget for every method
    for method in protocol["methods"].values():
        assert all(loss["name"] in LOSSES for loss in method["losses"])


def test_scaled_losses_and_selection(evidence, tmp_path):
    assert evidence.scaled_losses(PROTOCOL["methods"]["ka"], 0.5) == [{"name": "adapt", "weight": 1.0}]
    write(tmp_path, 0, "alone", val=60.0)
    write(tmp_path, 0, "ka-x0.5", val=61.0)
    write(tmp_path, 0, "ka-x1", val=63.0)
    write(tmp_path, 0, "kd-x0.5", val=62.0)
    with pytest.raises(SystemExit, match="kd x1 is missing"):
        evidence.select(PROTOCOL, tmp_path)
    write(tmp_path, 0, "kd-x1", val=59.0)
    assert evidence.select(PROTOCOL, tmp_path) == {"ka": 1.0, "kd": 0.5}
    assert "| ka | 61.00 | 63.00 |" in evidence.tuning_table(PROTOCOL, tmp_path)


def test_confirmation_table_pairs_each_seed_with_its_student_alone(evidence, tmp_path):
    (tmp_path / "selected.json").write_text(json.dumps({"ka": 1.0, "kd": 0.5}))
    for seed, alone, ka in ((3, 60.0, 63.0), (4, 62.0, 63.0)):
        write(tmp_path, seed, "alone", test=alone)
        write(tmp_path, seed, "ka-x1", test=ka)
    write(tmp_path, 3, "kd-x0.5", test=61.0)
    table = evidence.table(PROTOCOL, tmp_path, "test")
    assert "| ka-x1 | 63.00 ± 0.00 | +2.00 (+1.00..+3.00) | 3: 63.00 (+3.00), 4: 63.00 (+1.00) |" in table
    assert "| kd-x0.5 | (missing on some seed) | | |" in table
    assert "| alone | 61.00 ± 1.41 | | 3: 60.00, 4: 62.00 |" in table


def test_the_shipped_mosaic_configs_are_the_protocols_methods(evidence):
    """The comparison configs are the protocol's methods at their base weights (multiplier
    1), and distill.yaml is ka-ratio at the multiplier its development seed kept, so the
    demo and the evidence tables measure the same thing."""
    from kaseg.config import load_config
    from kaseg.tools.demo import CONFIGS

    protocol = evidence.read_protocol()
    methods = protocol["methods"]
    assert load_config(CONFIGS / "student.yaml").train.iterations == protocol["iterations"]
    configs = {p.stem: p for p in (CONFIGS / "compare").glob("*.yaml")}
    assert set(configs) == set(methods)
    for name, path in configs.items():
        config = load_config(path)
        assert list(config.distill.losses) == methods[name]["losses"], name
        assert config.distill.autoencoder == methods[name].get("autoencoder", False), name
    kept = evidence.select_method(protocol, evidence.PROTOCOL.parent, "ka-ratio")
    assert kept == 3.0
    distill = load_config(CONFIGS / "distill.yaml")
    assert list(distill.distill.losses) == evidence.scaled_losses(methods["ka-ratio"], kept)
    assert distill.distill.autoencoder


def fake_job(results, scores, seconds=0.0):
    """A ``job_command`` that writes the result a real run would (``scores[name]`` as its mIoU)."""

    def command(job, args):
        name = job.label().split("/")[1]
        path = results / f"seed{job.seed}" / f"{name}.json"
        score = scores.get(name, 50.0)
        record = json.dumps({"val": {"miou": score}, "test": {"miou": score}})
        write = f"p.parent.mkdir(parents=True, exist_ok=True); p.write_text({record!r})"
        write = "" if job.key == "autoencoder" else write
        script = f"import pathlib, time; p = pathlib.Path({str(path)!r}); time.sleep({seconds}); {write}"
        return [sys.executable, "-c", script]

    return command


def test_all_runs_the_missing_runs_by_priority_and_confirms_with_the_selected_multiplier(evidence, tmp_path,
                                                                                           monkeypatch):
    import argparse

    protocol = {**PROTOCOL, "methods": {"ka": {**PROTOCOL["methods"]["ka"], "autoencoder": True},
                                        "kd": PROTOCOL["methods"]["kd"]}}
    results = tmp_path / "results"
    for name in ("alone", "ka-x0.5", "ka-x1"):
        write(results, 0, name, val=60.0)
    jobs = evidence.plan_all(protocol, ["ka", "kd"], results, tmp_path / "runs")
    assert [job.label() for job in jobs] == [
        "seed3/autoencoder", "seed4/autoencoder", "seed3/alone", "seed4/alone", "seed3/ka-x?", "seed4/ka-x?",
        "seed0/kd-x0.5", "seed0/kd-x1", "seed3/kd-x?", "seed4/kd-x?",
    ]
    monkeypatch.setattr(evidence, "job_command", fake_job(results, {"kd-x0.5": 58.0, "kd-x1": 61.0}))
    args = argparse.Namespace(parallel=2, deadline=None, runs=tmp_path / "runs", results=results, device=None)
    report = evidence.run_all(jobs, protocol, args)
    started = [line.split("start ")[1] for line in report if "start " in line]
    assert len(started) == len(jobs) and not [line for line in report if "FAILED" in line or "not run" in line]
    for seed in (3, 4):  # knowledge adaptation needs its seed's auto-encoder first
        done = [line for line in report if "done" in line or "start" in line]
        assert done.index(next(x for x in done if f"done seed{seed}/autoencoder" in x)) < \
            done.index(next(x for x in done if f"start seed{seed}/ka-x0.5" in x))
    assert {"seed3/kd-x1", "seed4/kd-x1", "seed3/ka-x0.5", "seed4/ka-x0.5"} <= set(started)
    assert evidence.select(protocol, results) == {"ka": 0.5, "kd": 1.0}  # ties keep the first
    assert evidence.plan_all(protocol, ["ka", "kd"], results, tmp_path / "runs") == [
        job for job in evidence.plan_all(protocol, ["ka"], results, tmp_path / "runs")]  # only auto-encoders


def test_all_stops_at_the_deadline_and_says_what_it_left(evidence, tmp_path, monkeypatch):
    import argparse

    results = tmp_path / "results"
    jobs = [evidence.Job(0, "kd", m, False, 1) for m in (0.5, 1.0)]
    monkeypatch.setattr(evidence, "job_command", fake_job(results, {}, seconds=30))
    args = argparse.Namespace(parallel=1, deadline=2.0, runs=tmp_path / "runs", results=results, device=None)
    report = evidence.run_all(jobs, PROTOCOL, args)
    assert any("stopped seed0/kd-x0.5 at the deadline" in line for line in report)
    assert any("not run seed0/kd-x1: no time left" in line for line in report)
    assert not (results / "seed0").exists()


def test_a_waiting_higher_tier_job_keeps_its_slot(evidence, tmp_path, monkeypatch):
    import argparse

    protocol = {**PROTOCOL, "methods": {"ka": {**PROTOCOL["methods"]["ka"], "autoencoder": True},
                                        "kd": PROTOCOL["methods"]["kd"]}}
    results = tmp_path / "results"
    jobs = [evidence.Job(3, "autoencoder", None, False, 0), evidence.Job(3, "ka", 1.0, True, 0),
            evidence.Job(0, "kd", 0.5, False, 1), evidence.Job(0, "kd", 1.0, False, 1)]
    monkeypatch.setattr(evidence, "job_command", fake_job(results, {}, seconds=1))
    args = argparse.Namespace(parallel=2, deadline=None, runs=tmp_path / "runs", results=results, device=None)
    report = [line.split("] ")[1].split(" in ")[0] for line in evidence.run_all(jobs, protocol, args)]
    # Two slots: the auto-encoder's and the one kept for ka, which waits for it.
    assert report[:4] == ["start seed3/autoencoder", "done seed3/autoencoder", "start seed3/ka-x1",
                          "start seed0/kd-x0.5"]


def test_the_table_selects_what_it_can_before_every_method_is_tuned(evidence, tmp_path):
    write(tmp_path, 0, "kd-x0.5", val=62.0)
    write(tmp_path, 0, "kd-x1", val=64.0)
    for seed in (3, 4):
        write(tmp_path, seed, "alone", val=60.0)
        write(tmp_path, seed, "kd-x1", val=61.0)
    table = evidence.table(PROTOCOL, tmp_path, "val")  # no selected.json yet, ka untuned
    lines = table.splitlines()
    assert lines[2].startswith("| alone | 60.00") and lines[3] == "| ka | (tuning incomplete) | | |"
    assert lines[4].startswith("| kd-x1 | 61.00 ± 0.00 | +1.00 (+1.00..+1.00)")


def test_the_table_of_a_rerun_takes_the_multipliers_from_the_tuning_folder(evidence, tmp_path):
    tuning, rerun = tmp_path / "tuning", tmp_path / "rerun"
    write(tuning, 0, "ka-x0.5", val=64.0)
    write(tuning, 0, "ka-x1", val=62.0)
    for seed, alone, ka in ((3, 60.0, 61.0), (4, 62.0, 65.0)):
        write(rerun, seed, "alone", val=alone)
        write(rerun, seed, "ka-x0.5", val=ka)
    assert "| ka | (tuning incomplete) | | |" in evidence.table(PROTOCOL, rerun, "val")
    lines = evidence.table(PROTOCOL, rerun, "val", tuning=tuning, methods=["ka"]).splitlines()
    assert len(lines) == 4  # header, rule, alone, ka: kd left out
    assert lines[3] == "| ka-x0.5 | 63.00 ± 2.83 | +2.00 (+1.00..+3.00) | 3: 61.00 (+1.00), 4: 65.00 (+3.00) |"


def test_the_table_of_fresh_seeds_reads_the_seeds_it_is_given(evidence, tmp_path):
    tuning, fresh = tmp_path / "tuning", tmp_path / "fresh"
    write(tuning, 0, "ka-x0.5", val=61.0)
    write(tuning, 0, "ka-x1", val=62.0)
    write(fresh, 6, "alone", val=60.0)
    write(fresh, 6, "ka-x1", val=64.5)
    assert "| alone | (missing on some seed) | | |" in evidence.table(PROTOCOL, fresh, "val", tuning=tuning)
    lines = evidence.table(PROTOCOL, fresh, "val", tuning=tuning, methods=["ka"], seeds=[6]).splitlines()
    assert lines[2:] == ["| alone | 60.00 ± 0.00 | | 6: 60.00 |",
                         "| ka-x1 | 64.50 ± 0.00 | +4.50 (+4.50..+4.50) | 6: 64.50 (+4.50) |"]


def test_a_failed_auto_encoder_leaves_its_methods_out_and_the_rest_runs(evidence, tmp_path, monkeypatch):
    import argparse

    protocol = {**PROTOCOL, "methods": {"ka": {**PROTOCOL["methods"]["ka"], "autoencoder": True},
                                        "kd": PROTOCOL["methods"]["kd"]}}
    results = tmp_path / "results"
    jobs = [evidence.Job(3, "autoencoder", None, False, 0), evidence.Job(3, "ka", 1.0, True, 0),
            evidence.Job(0, "kd", 0.5, False, 1)]
    working = fake_job(results, {})
    monkeypatch.setattr(evidence, "job_command",
                        lambda job, args: [sys.executable, "-c", "raise SystemExit(3)"] if job.key == "autoencoder"
                        else working(job, args))
    args = argparse.Namespace(parallel=1, deadline=None, runs=tmp_path / "runs", results=results, device=None)
    report = [line.split("] ")[1].split(" in ")[0] for line in evidence.run_all(jobs, protocol, args)]
    assert report[1].startswith("FAILED seed3/autoencoder (exit 3")
    assert report[2:] == ["not run seed3/ka-x1: its auto-encoder failed", "start seed0/kd-x0.5", "done seed0/kd-x0.5"]


def test_curves_average_the_seeds_and_pair_each_with_its_student_alone(evidence, tmp_path):
    (tmp_path / "selected.json").write_text(json.dumps({"ka": 1.0, "kd": 0.5}))
    for seed, alone, ka in ((3, [[250, 10.0], [500, 40.0]], [[250, 4.0], [500, 45.0]]),
                            (4, [[250, 20.0], [500, 50.0], [750, 55.0]], [[250, 12.0], [500, 51.0], [750, 57.0]])):
        for name, curve in (("alone", alone), ("ka-x1", ka)):
            (tmp_path / f"seed{seed}").mkdir(exist_ok=True)
            (tmp_path / f"seed{seed}" / f"{name}.json").write_text(json.dumps({"curve": curve}))
    by_seed = evidence.load_results(tmp_path, [3, 4])
    series = evidence.paired_curves(by_seed, "ka-x1")
    assert series["steps"] == [250, 500]  # 750: seed 3 never evaluated there
    assert series["mean"] == [8.0, 48.0]
    assert series["seeds"] == [[4.0, 45.0], [12.0, 51.0]]
    assert series["gain_mean"] == [-7.0, 3.0]
    assert (series["gain_min"], series["gain_max"]) == ([-8.0, 1.0], [-6.0, 5.0])
    out = tmp_path / "plots" / "curves.png"
    assert evidence.curves(PROTOCOL, tmp_path, out) == ["alone", "ka-x1"]  # kd-x0.5: on no seed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="student alone is missing"):
        evidence.curves(PROTOCOL, tmp_path, out, seeds=[3, 5])
