"""`--runtime auto` (README "Runtimes"): the runtime 'clipn weights tune' measured for these weights on
this machine, else torch; the runtime in the provenance of reports and calibrations; a worker that
loads its driver's export and never exports; ONNX Runtime's CUDA provider refused in one line."""

from __future__ import annotations

import html
import json
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import pytest

from conftest import IMAGES, cli

CLASSES = "cat,horse,rocket,coffee"
PICTURES = [str(IMAGES / name) for name in ("chelsea.png", "horse.png", "rocket.jpg")]
EXACT = 1e-5  # README "Runtimes": fp32 on any runtime
needs_onnx = pytest.mark.skipif(find_spec("onnxruntime") is None or find_spec("onnx") is None, reason="needs the onnx extra")


def runtimes_folder() -> Path:
    from clipn_cli.weights.home import weights_home

    return weights_home() / "runtimes"


def fingerprint(weights: Path) -> str:
    from clipn_cli.weights.home import read_header

    return read_header(weights)["fingerprint"]


def detect(weights: Path, tmp_path: Path, *args: str) -> tuple[list[dict], str, str]:
    """(records, stderr, the report's text) of a detect run with the default --runtime."""
    report = tmp_path / "report.html"
    result = cli("detect", "-w", str(weights), "-c", CLASSES, "--format", "jsonl", "--report", str(report), *args, *PICTURES)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr, html.unescape(report.read_text(encoding="utf-8"))


def test_auto_without_a_record_is_torch_and_the_report_says_so(tiny_weights: Path, tmp_path: Path) -> None:
    records, stderr, report = detect(tiny_weights, tmp_path)
    assert "--runtime auto" not in stderr
    assert f"torch fp32 (torch {version('torch')})" in report
    assert not runtimes_folder().exists()  # nothing exported
    explicit = cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--format", "jsonl", "--runtime", "torch", *PICTURES)
    assert [json.loads(line) for line in explicit.stdout.splitlines()] == records  # bit for bit: auto is torch


@needs_onnx
def test_auto_runs_the_recorded_runtime_within_the_exact_bound(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.choice import record_measurement

    torch_records, _, _ = detect(tiny_weights, tmp_path, "--runtime", "torch")
    record_measurement(runtimes_folder(), fingerprint(tiny_weights), "onnx", {})
    records, stderr, report = detect(tiny_weights, tmp_path)
    assert "--runtime auto: onnx" in stderr and stderr.count("--runtime auto") == 1
    assert f"onnx fp32 (onnxruntime {version('onnxruntime')})" in report
    assert list(runtimes_folder().glob("*.onnx"))  # the export it ran
    for got, want in zip(records, torch_records, strict=True):
        assert abs(got["ctw_score"] - want["ctw_score"]) <= EXACT and abs(got["atd_score"] - want["atd_score"]) <= EXACT
    _, stderr, report = detect(tiny_weights, tmp_path, "--precision", "bf16")  # auto chooses only among exact fp32 runtimes
    assert "--runtime auto" not in stderr and "torch bf16" in report


def test_a_record_for_other_weights_or_another_machine_is_not_used(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.choice import machine_key, measured_runtime, record_path

    mine = machine_key(fingerprint(tiny_weights))
    others = [
        {**mine, "weights_fingerprint": "0" * 64, "winner": "onnx"},
        {**mine, "cpu": "Some Other CPU 9000", "winner": "onnx"},
        {**mine, "versions": {**mine["versions"], "onnxruntime": "0.0.1"}, "winner": "onnx"},
    ]
    runtimes_folder().mkdir(parents=True)
    record_path(runtimes_folder()).write_text(json.dumps({"records": others}))
    assert measured_runtime(runtimes_folder(), mine["weights_fingerprint"]) == (None, None)
    _, stderr, report = detect(tiny_weights, tmp_path)
    assert "--runtime auto" not in stderr and "torch fp32" in report
    assert not list(runtimes_folder().glob("*.onnx"))


@pytest.mark.parametrize(("content", "why"), [
    (b"{not json", "Expecting property name"),
    (b"[1, 2]", "not a list of runtime measurements"),
    (b'{"records": "onnx"}', "not a list of runtime measurements"),
    (b" " * (1 << 20) + b"{}", "larger"),
    (None, "no runtime"),
])
def test_a_damaged_record_is_ignored_with_one_warning(tiny_weights: Path, tmp_path: Path, content: bytes | None, why: str) -> None:
    from clipn_cli.runtimes.choice import machine_key, record_path

    runtimes_folder().mkdir(parents=True)
    if content is None:  # the right key, a winner that is no runtime
        content = json.dumps({"records": [{**machine_key(fingerprint(tiny_weights)), "winner": "import os"}]}).encode()
    record_path(runtimes_folder()).write_bytes(content)
    _, stderr, report = detect(tiny_weights, tmp_path)
    warnings = [line for line in stderr.splitlines() if "measured.json" in line]
    assert len(warnings) == 1 and "ignored" in warnings[0] and why in warnings[0], stderr
    assert "torch fp32" in report


@needs_onnx
def test_tune_measures_every_installed_exact_runtime_and_auto_follows_it(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.choice import measured_runtime, read_records
    from clipn_cli.runtimes.measure import installed_runtimes

    result = cli("weights", "tune", str(tiny_weights), "--batch", "2", "--rounds", "2")
    assert result.returncode == 0, result.stderr
    winner = result.stdout.strip()
    (record,), warning = read_records(runtimes_folder())
    assert warning is None and record["winner"] == winner
    measured = record["results"]
    assert set(measured["seconds_per_batch"]) == set(installed_runtimes()) and {"torch", "onnx"} <= set(measured["seconds_per_batch"])
    assert all(diff <= EXACT for diff in measured["max_ctw_atd_diff"].values())
    assert winner == min(measured["seconds_per_batch"], key=measured["seconds_per_batch"].get)
    assert measured_runtime(runtimes_folder(), fingerprint(tiny_weights)) == (winner, None)
    _, stderr, report = detect(tiny_weights, tmp_path)
    assert f"{winner} fp32" in report and (("--runtime auto: " + winner) in stderr) == (winner != "torch")


@needs_onnx
def test_calibration_and_eval_report_record_the_runtime(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.scores.calibration import Calibration

    out = tmp_path / "cal.json"
    result = cli("calibrate", *PICTURES, "-w", str(tiny_weights), "-c", CLASSES, "--alpha", "0.5", "--runtime", "onnx", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert Calibration.load(out).settings["runtime"] == f"onnx fp32 (onnxruntime {version('onnxruntime')})"
    report = tmp_path / "eval.html"
    result = cli("eval", "-w", str(tiny_weights), "-c", CLASSES, "--id", PICTURES[0], "--id", PICTURES[1], "--ood", f"x={PICTURES[2]}",
                 "--runtime", "onnx", "--format", "json", "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert f"onnx fp32 (onnxruntime {version('onnxruntime')})" in html.unescape(report.read_text(encoding="utf-8"))


@needs_onnx
def test_a_worker_loads_its_drivers_export_and_never_exports(tiny_weights: Path) -> None:
    from clipn_cli.errors import WeightsError
    from clipn_cli.model.devices import RunRequest
    from clipn_cli.runtimes.onnx_export import export_path
    from clipn_cli.scale.worker import ScoreOptions, Worker, WorkerConfig
    from clipn_cli.weights.checkpoints import load_model
    from clipn_cli.runtimes.onnx_export import cached_export

    request = RunRequest("cpu", runtime="onnx", forward_batch=3)
    absent = export_path(runtimes_folder(), fingerprint(tiny_weights))
    with pytest.raises(WeightsError, match="not an ONNX file"):
        Worker(WorkerConfig(str(tiny_weights), request, runtime_file=str(absent)), None, ScoreOptions())
    assert not absent.exists()  # a worker never exports
    with pytest.raises(ValueError, match="needs the file its driver exported"):
        Worker(WorkerConfig(str(tiny_weights), request), None, ScoreOptions())
    model, info = load_model(tiny_weights, device="cpu", text=False)
    path = cached_export(model, runtimes_folder(), info.fingerprint)
    worker = Worker(WorkerConfig(str(tiny_weights), request, runtime_file=str(path)), None, ScoreOptions())
    assert (worker.run.runtime, worker.run.forward_batch, worker.model.image_runtime.name) == ("onnx", 3, "onnx")


def test_onnx_on_cuda_without_the_cuda_provider_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from clipn_cli.errors import DeviceError
    from clipn_cli.runtimes.towers import onnx_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match=r"^--runtime onnx --device cuda needs ONNX Runtime's CUDAExecutionProvider.*onnxruntime-gpu") as caught:
        onnx_providers("cuda")
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("cuda:0") == ["CUDAExecutionProvider"]
