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
