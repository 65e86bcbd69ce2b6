"""scripts/evidence.py: the protocol's selection and tables on hand-made results."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("evidence", REPO / "scripts" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
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


def test_the_shipped_mosaic_configs_use_the_protocols_base_weights(evidence):
    """The demo's distilled student and its comparison methods are the protocol's methods
    at multiplier 1, so the demo and the evidence table measure the same thing."""
    from kaseg.config import load_config
    from kaseg.tools.demo import CONFIGS

    protocol = evidence.read_protocol()
    methods = protocol["methods"]
    assert load_config(CONFIGS / "student.yaml").train.iterations == protocol["iterations"]
    configs = {"ka": CONFIGS / "distill.yaml"} | {p.stem: p for p in (CONFIGS / "compare").glob("*.yaml")}
    assert set(configs) == set(methods)
    for name, path in configs.items():
        config = load_config(path)
        assert list(config.distill.losses) == methods[name]["losses"], name
        assert config.distill.autoencoder == methods[name].get("autoencoder", False), name
