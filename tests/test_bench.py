"""``kaseg bench`` / ``kaseg info``: fields, ratios, model specs and hand-counted FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from kaseg.cli import main
from kaseg.config import Config, to_dict
from kaseg.engine.checkpoint import save_checkpoint
from kaseg.models import build_model
from kaseg.tools.bench import bench, format_table, load_any_model, parse_model_spec
from kaseg.tools.profile import count_flops, model_profile

TINY = dict(width=0.35, head_channels=16, aspp=False, output_stride=16, num_classes=3)
TINY_SPEC = "width=0.35,head_channels=16,aspp=false,output_stride=16,num_classes=3"
SIZE = (64, 64)


pytestmark = pytest.mark.usefixtures("one_thread")


class ConvOnly(nn.Module):
    """A segmenter-shaped module made of one convolution, for counting FLOPs by hand."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.conv(images)
        return {"features": features, "logits": features}


@pytest.mark.parametrize(
    "conv, expected",
    [
        # 2 FLOPs per multiply-add x output pixels x out channels x in channels x kernel.
        (nn.Conv2d(3, 4, 3, padding=1, bias=False), 2 * 8 * 8 * 4 * 3 * 3 * 3),
        (nn.Conv2d(3, 4, 1, bias=False), 2 * 8 * 8 * 4 * 3),
        # Dilation spreads the taps but does not change how many there are.
        (nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False), 2 * 8 * 8 * 4 * 3 * 3 * 3),
        # Stride 2: a quarter of the output pixels.
        (nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), 2 * 4 * 4 * 4 * 3 * 3 * 3),
    ],
)
def test_flops_match_hand_count(conv: nn.Conv2d, expected: int) -> None:
    model = ConvOnly(conv)
    assert count_flops(model, (8, 8)) == expected
    assert count_flops(model, (8, 8), batch=3) == 3 * expected
    profile = model_profile(model, (8, 8))
    assert profile["flops"] == expected
    assert profile["macs"] == expected // 2
    assert profile["params"] == conv.weight.numel()


def test_parse_model_spec() -> None:
    assert parse_model_spec("deeplabv3_mobilenetv2:width=0.5,aspp=false,output_stride=16") == (
        "deeplabv3_mobilenetv2",
        {"width": 0.5, "aspp": False, "output_stride": 16},
    )
    assert parse_model_spec("deeplabv3plus_resnet50") == ("deeplabv3plus_resnet50", {})
    # A list value keeps its commas.
    assert parse_model_spec("deeplabv3_resnet18:aspp_rates=[6, 12,18],head_channels=64") == (
        "deeplabv3_resnet18",
        {"aspp_rates": [6, 12, 18], "head_channels": 64},
    )
    with pytest.raises(ValueError, match="key=value"):
        parse_model_spec("deeplabv3_mobilenetv2:width")
    with pytest.raises(ValueError, match="twice"):
        parse_model_spec("deeplabv3_mobilenetv2:width=0.5,width=1.0")


def test_parse_model_spec_keeps_checkpoint_paths_with_colons(tmp_path) -> None:
    path = tmp_path / "run:1.pt"
    path.write_bytes(b"")
    assert parse_model_spec(str(path)) == (str(path), {})


def test_load_any_model(tmp_path) -> None:
    zoo = load_any_model("deeplabv3_mobilenetv2", {k: v for k, v in TINY.items() if k != "num_classes"})
    assert zoo.num_classes == 21 and not zoo.training

    model = build_model("deeplabv3_mobilenetv2", **TINY)
    path = tmp_path / "best.pt"
    save_checkpoint({"arch": model.arch, "model": model.state_dict(), "config": to_dict(Config())}, path)
    loaded = load_any_model(str(path), {})
    assert loaded.arch == model.arch
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    with pytest.raises(ValueError, match="architecture is stored"):
        load_any_model(str(path), {"width": 0.5})
    with pytest.raises(ValueError, match=r"unknown model 'deeplabv9'.*deeplabv3_mobilenetv2"):
        load_any_model("deeplabv9", {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any_model(str(tmp_path / "missing.pt"), {})


def _check_rows(rows: list[dict], specs: list[str], strides: tuple[int, ...] = (16, 16)) -> None:
    assert [row["model"] for row in rows] == specs
    for row, stride in zip(rows, strides):
        assert isinstance(row["params"], int) and row["params"] > 0
        assert isinstance(row["macs"], int) and isinstance(row["flops"], int)
        assert row["macs"] == row["flops"] // 2
        assert row["gflops"] == pytest.approx(row["flops"] / 1e9)
        assert isinstance(row["latency_ms"], float) and row["latency_ms"] > 0
        assert row["latency_p90_ms"] >= row["latency_ms"]
        assert row["output_stride"] == stride
        assert row["device"] == "cpu"
        assert row["size"] == list(SIZE)
        assert row["batch"] == 1
    first, second = rows
    assert first["params_ratio"] == first["gflops_ratio"] == first["latency_ratio"] == 1.0
    assert second["params_ratio"] == pytest.approx(second["params"] / first["params"])
    assert second["gflops_ratio"] == pytest.approx(second["gflops"] / first["gflops"])
    assert second["latency_ratio"] == pytest.approx(second["latency_ms"] / first["latency_ms"])


def test_bench_two_models() -> None:
    specs = [f"deeplabv3_mobilenetv2:{TINY_SPEC}", f"deeplabv3plus_mobilenetv2:{TINY_SPEC}"]
    rows = bench(specs, size=SIZE, runs=2)
    _check_rows(rows, specs)
    # The params match a model built directly with the same arguments.
    direct = build_model("deeplabv3_mobilenetv2", **TINY)
    assert rows[0]["params"] == sum(p.numel() for p in direct.parameters())
    # DeepLabV3+ adds a decoder on top of the same backbone.
    assert rows[1]["params"] > rows[0]["params"] and rows[1]["gflops"] > rows[0]["gflops"]
    table = format_table(rows)
    assert "deeplabv3plus_mobilenetv2" in table and "GFLOPs" in table
    lines = table.splitlines()
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_bench_cli_json(capsys) -> None:
    specs = [
        f"deeplabv3_mobilenetv2:{TINY_SPEC}",
        f"deeplabv3_mobilenetv2:{TINY_SPEC.replace('output_stride=16', 'output_stride=32')}",
    ]
    main(["bench", *specs, "--json", "--size", "64", "64", "--runs", "2"])
    rows = json.loads(capsys.readouterr().out)
    _check_rows(rows, specs, strides=(16, 32))
    # Same weights, so the same parameter count; stride 32 halves the head's grid.
    assert rows[1]["params_ratio"] == 1.0
    assert rows[1]["gflops_ratio"] < 1.0


def test_bench_onnx_latency() -> None:
    pytest.importorskip("onnxruntime")
    (row,) = bench([f"deeplabv3_mobilenetv2:{TINY_SPEC}"], size=SIZE, runs=2, onnx=True)
    assert row["onnx_latency_ms"] > 0 and row["onnx_latency_p90_ms"] >= row["onnx_latency_ms"]
    assert "params_ratio" not in row  # ratios only compare several models
    assert "onnx ms" in format_table([row])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_bench_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        bench([f"deeplabv3_mobilenetv2:{TINY_SPEC}"], size=SIZE, device="cuda")


@pytest.mark.parametrize("name, stride", [("deeplabv3_mobilenetv2", 16), ("deeplabv3plus_mobilenetv2", 4)])
def test_info_cli_json(capsys, name: str, stride: int) -> None:
    args = ["width=0.35", "head_channels=16", "aspp=false", "output_stride=16", "num_classes=3"]
    main(["info", name, *args, "--size", "64", "64", "--json"])
    info = json.loads(capsys.readouterr().out)
    model = build_model(name, **TINY)
    assert info["model"] == name
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["output_stride"] == 16
    assert info["feature_stride"] == stride
    assert info["feature_shape"] == [16, math.ceil(64 / stride), math.ceil(64 / stride)]
    assert info["macs"] == info["flops"] // 2
    assert info["input_size"] == [64, 64]


# ---------------------------------------------------------------- inference paths and the machine's limit


def test_bench_reports_every_path(capsys) -> None:
    """`kaseg bench --int8 --json`: latency, rate, fraction of peak and speed-up of every path."""
    pytest.importorskip("onnxruntime")
    spec = f"deeplabv3_mobilenetv2:{TINY_SPEC}"
    main(["bench", spec, "--json", "--size", "64", "64", "--runs", "2", "--int8", "--threads", "1"])
    (row,) = json.loads(capsys.readouterr().out)
    assert list(row["paths"]) == ["eager", "channels_last", "onnx", "int8"]
    assert row["threads"] == 1 and row["peak_gflops"] > 0
    eager = row["paths"]["eager"]["latency_ms"]
    for name, path in row["paths"].items():
        assert path["latency_p90_ms"] >= path["latency_ms"] > 0, name
        # Rate = model FLOPs / latency (int8 in the fp32 model's FLOPs), a fraction of the peak.
        assert path["gflops_per_s"] == pytest.approx(row["flops"] / (path["latency_ms"] / 1000) / 1e9)
        assert path["peak_fraction"] == pytest.approx(path["gflops_per_s"] / row["peak_gflops"])
        assert path["speedup"] == pytest.approx(eager / path["latency_ms"])
    # The legacy keys are the eager and onnxruntime fp32 paths.
    assert row["latency_ms"] == eager and row["onnx_latency_ms"] == row["paths"]["onnx"]["latency_ms"]
    assert row["fastest_path"] == min(row["paths"], key=lambda p: row["paths"][p]["latency_ms"])


def test_bench_table_lists_paths() -> None:
    (row,) = bench([f"deeplabv3_mobilenetv2:{TINY_SPEC}"], size=SIZE, runs=1, peak=False)
    assert row["peak_gflops"] is None and row["paths"]["eager"]["peak_fraction"] is None
    table = format_table([row])
    assert "eager fp32 channels_last" in table and "x eager" in table


def test_time_interleaved_takes_turns_in_blocks(monkeypatch) -> None:
    from kaseg.tools import profile

    monkeypatch.setattr(profile.time, "sleep", lambda seconds: None)
    calls: list[str] = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = profile.time_interleaved(runners, warmup=1, runs=3, block=2)
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    # Warm-up, then turns: one untimed call + up to `block` timed calls per runner.
    assert "".join(calls) == "a" "b" "aaa" "bbb" "aa" "bb"


def test_matmul_peak_is_flops_over_the_best_time(monkeypatch) -> None:
    """2 n^3 FLOPs over the fastest of the repeats, with a fake clock (run k takes k ms)."""
    from kaseg.tools import profile

    ticks = iter([0.0, 0.003, 1.0, 1.001, 2.0, 2.002])  # 3 ms, 1 ms, 2 ms
    monkeypatch.setattr(profile.time, "perf_counter", lambda: next(ticks))
    threads = torch.get_num_threads()
    assert profile.matmul_peak_gflops(1, size=64, repeats=3) == pytest.approx(2 * 64**3 / 0.001 / 1e9)
    assert torch.get_num_threads() == threads  # restored
    assert profile.achieved_rate(4e9, 20.0, 400.0) == {"gflops_per_s": pytest.approx(200.0),
                                                        "peak_fraction": pytest.approx(0.5)}


def test_fastest_latency_returns_the_fastest_path() -> None:
    from kaseg.tools.bench import fastest_latency

    model = build_model("deeplabv3_mobilenetv2", **TINY)
    result = fastest_latency(model, SIZE, runs=2, warmup=1, paths=["eager", "channels_last"])
    assert set(result["paths"]) == {"eager", "channels_last"}
    best = min(result["paths"].values(), key=lambda stats: stats["latency_ms"])
    assert result["latency_ms"] == best["latency_ms"] and result["latency_p90_ms"] == best["latency_p90_ms"]
    assert result["paths"][result["path"]] == best
    with pytest.raises(ValueError, match="unknown inference path"):
        fastest_latency(model, SIZE, runs=1, paths=["tensorrt"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "no_such_model", "--size", "64", "64"], "model 'no_such_model': unknown model"),
        (["bench", "deeplabv3_mobilenetv2:width=3", "--size", "64", "64"], "width must be one of"),
        (["info", "deeplabv3_mobilenetv2", "width=3"], "width must be one of"),
    ],
)
def test_bad_model_specs_are_one_line_errors(capsys, argv: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
