"""Config loading: YAML with bases, overrides, unknown keys and type errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaseg.config import Config, ConfigError, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "kaseg" / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_overrides():
    config = load_config(None, ["model.width=0.5", "data.crop_size=[64, 96]", "train.grad_clip=1.5"])
    assert config.model.width == 0.5
    assert config.data.crop_size == (64, 96)
    assert config.train.grad_clip == 1.5
    assert config.distill.losses[0] == {"name": "adapt", "weight": 50.0}
    assert Config().autoencoder.alpha == 1e-7


def test_base_files_merge_sections(tmp_path):
    write(tmp_path / "base.yaml", "data: {name: shapes, batch_size: 4}\ntrain: {lr: 0.1}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ndata: {batch_size: 8}\n")
    config = load_config(child, ["train.iterations=5"])
    assert config.data.name == "shapes" and config.data.batch_size == 8
    assert config.train.lr == 0.1 and config.train.iterations == 5


def test_unknown_keys_list_the_valid_ones(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {iteratons: 5}\n")
    with pytest.raises(ConfigError, match=r"train\.iteratons.*valid keys: .*iterations"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["modle.name=x"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.iterations=1.5", "expected an integer"),
        ("train.amp=fp8", "not one of"),
        ("data.crop_size=[1,2,3]", "expected 2 values"),
        ("model.aspp=maybe", "expected true or false"),
        ("train.lr=fast", "expected a number"),
        ("nonsense", "key.sub=value"),
    ],
)
def test_type_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))


def test_round_trip_through_plain_dict(tmp_path):
    config = load_config(None, ["model.aspp_rates=[1,2,3]"])
    import yaml

    path = write(tmp_path / "resolved.yaml", yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load(path):
    load_config(path)


# ---------------------------------------------------------------- validation through the CLI

# (override, the key the message names, a valid value or hint it lists)
CONFIG_ERRORS = {
    "unknown-key": ("train.iteratons=5", "train.iteratons", "iterations"),
    "unknown-section": ("modle.name=x", "modle", "model"),
    "bad-type": ("train.lr=fast", "train.lr", "expected a number"),
    "bad-choice": ("train.amp=fp8", "train.amp", "bf16"),
    "unknown-loss": ("distill.losses=[{name: nosuchloss, weight: 1}]", "distill.losses[0].name", "affinity"),
    "loss-not-a-mapping": ("distill.losses=[kd]", "distill.losses[0]", "mapping"),
    "unknown-loss-parameter": ("distill.losses=[{name: kd, T: 2}]", "distill.losses[0]", "temperature"),
    "bad-loss-parameter-value": ("distill.losses=[{name: kd, temperature: -1}]", "losses[0].temperature", "> 0"),
    "bad-loss-parameter-choice": ("distill.losses=[{name: affinity, source: x}]", "losses[0].source", "student"),
    "bad-loss-parameter-type": ("distill.losses=[{name: adapt, p: two}]", "distill.losses[0].p", "expected a number"),
    "bad-loss-weight": ("distill.losses=[{name: kd, weight: heavy}]", "distill.losses[0].weight", "number"),
    "duplicate-loss-key": ("distill.losses=[{name: kd}, {name: kd}]", "distill.losses[1].key", "distinct"),
    "unknown-model": ("model.name=nosuchmodel", "nosuchmodel", "deeplabv3_mobilenetv2"),
    "bad-output-stride": ("model.output_stride=12", "output_stride", "(8, 16, 32)"),
    "bad-width": ("model.width=0.3", "width", "0.35"),
    "bad-decoder-stride": ("model.decoder_stride=8", "decoder_stride", "deeplabv3plus"),
    "unknown-model-source": ("model.source=keras", "model.source", "torchvision"),
    "unknown-data-set": ("data.name=nosuchdata", "data.name", "shapes"),
    "unknown-data-option": ("data.options={nosuch: 1}", "data.options", "split_ratio"),
    "bad-data-option-type": ("data.options={split_ratio: half}", "data.options.split_ratio", "float"),
    "flip-of-asymmetric-classes": ("data.name=mosaic", "data.hflip", "hflip=false"),
    "unknown-split": (["data.name=mosaic", "data.hflip=false", "data.val_split=bogus"], "data.val_split",
                      "train, val, test"),
    "negative-iterations": ("train.iterations=-5", "train.iterations", ">= 1"),
    "negative-distillation-warmup": ("distill.warmup_iterations=-1", "distill.warmup_iterations", ">= 0"),
    "zero-batch-size": ("data.batch_size=0", "data.batch_size", ">= 1"),
    "zero-learning-rate": ("train.lr=0", "train.lr", "> 0"),
    "nan": ("train.weight_decay=.nan", "train.weight_decay", ">= 0"),
    "bad-crop-size": ("data.crop_size=[0,32]", "data.crop_size", ">= 1"),
    "reversed-scale-range": ("data.scale_range=[2,1]", "data.scale_range", "low <= high"),
    "no-eval-scales": ("eval.scales=[]", "eval.scales", "non-empty"),
    "eval-stride-beyond-window": ("eval.stride=[64,64]", "eval.stride", "[32, 32]"),
    "bad-device": ("train.device=gpu", "train.device", "cuda"),
    "zero-code-channels": ("autoencoder.code_channels=0", "autoencoder.code_channels", ">= 1"),
}


def _config_without_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A distillation config whose data root and checkpoints do not exist: a config error
    must be reported before any of them is looked at."""
    from conftest import tiny_config, write_config

    missing = {name: tmp_path / "missing" / name for name in ("data", "teacher.pt", "autoencoder.pt")}
    config = tiny_config(
        tmp_path / "runs", "bad",
        data={"name": "folder", "root": str(missing["data"]), "options": {}},
        teacher={"checkpoint": str(missing["teacher.pt"])},
        autoencoder={"checkpoint": str(missing["autoencoder.pt"]), "code_channels": 4},
    )
    return write_config(tmp_path / "distill.yaml", config), missing


def _run_distill(argv: list[str], capsys) -> tuple[int, list[str], str]:
    from kaseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--config", *argv])
    err = capsys.readouterr().err
    return exit_info.value.code, [line for line in err.splitlines() if line.startswith("kaseg distill: error:")], err


def test_without_a_config_error_the_missing_files_are_what_fails(tmp_path, capsys):
    # The reference for the test below: this config is valid, so distill goes on to the
    # data set and stops there.
    path, missing = _config_without_files(tmp_path)
    code, errors, err = _run_distill([str(path)], capsys)
    assert code == 2 and len(errors) == 1 and str(missing["data"]) in errors[0]


@pytest.mark.parametrize("error", CONFIG_ERRORS, ids=str)
def test_config_errors_are_one_line_before_any_file_is_read(tmp_path, capsys, error):
    override, key, valid = CONFIG_ERRORS[error]
    path, missing = _config_without_files(tmp_path)
    overrides = [override] if isinstance(override, str) else override
    code, errors, err = _run_distill([str(path), *overrides], capsys)
    assert code == 2
    assert len(errors) == 1, err
    assert "Traceback" not in err
    message = errors[0]
    assert key in message and valid in message, message
    assert not any(str(p) in message for p in missing.values())
    assert not (tmp_path / "runs").exists()  # no run folder: nothing was started


@pytest.mark.slow  # a fresh interpreter importing torch: ~3 s idle, ~12 s on a loaded machine
def test_the_unknown_loss_of_the_issue_prints_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run(
        [sys.executable, "-m", "kaseg.cli", "distill", "--config", str(CONFIGS / "shapes" / "distill.yaml"),
         f"output_dir={tmp_path}", "distill.losses=[{name: nosuchloss, weight: 1}]"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kaseg distill: error: distill.losses[0].name: unknown distillation loss 'nosuchloss'; valid: "
        + ", ".join(__import__("kaseg.distill", fromlist=["LOSSES"]).LOSSES.names())
    ]
    assert not any(tmp_path.iterdir())


def test_loss_checks_draw_no_random_numbers():
    import torch

    from kaseg.distill import LOSSES
    from kaseg.distill.losses import check_loss_specs

    state = torch.get_rng_state()
    specs = check_loss_specs([{"name": name, "key": name} for name in LOSSES.names()])
    assert [s.name for s in specs] == LOSSES.names()
    assert torch.equal(torch.get_rng_state(), state)
