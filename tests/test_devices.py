"""The device policy and a run's sizes, resolved in one place (model/devices.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clipn_cli.errors import ClipnError, DeviceError, OptionsError
from clipn_cli.model.devices import RunOptions, resolve_device
from clipn_cli.weights.checkpoints import load_model


def test_load_model_takes_auto_as_the_cli_does(tiny_weights: Path) -> None:
    model, _ = load_model(tiny_weights, device="auto")
    assert next(model.parameters()).device.type == resolve_device("auto").type


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_a_misspelt_device_is_a_user_error_not_torchs(tiny_weights: Path, device: str) -> None:
    with pytest.raises(DeviceError, match=f"unsupported device '{device}'") as caught:
        load_model(tiny_weights, device=device)
    assert isinstance(caught.value, ClipnError) and isinstance(caught.value, ValueError)  # the old type still catches it


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_device_is_a_user_error(tiny_weights: Path) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_model(tiny_weights, device="cuda:1")


def test_run_options_default_every_size_once_for_the_device() -> None:
    run = RunOptions.resolve("cpu")
    assert (run.device, run.precision) == (torch.device("cpu"), "fp32")
    assert (run.forward_batch, run.decode_workers, run.prefetch, run.score_chunk) == (12, min(4, os.cpu_count() or 1), 24, 12)
    small = RunOptions.resolve(torch.device("cpu"), forward_batch=3, decode_workers=0, precision="bf16")
    assert (small.forward_batch, small.decode_workers, small.prefetch, small.score_chunk, small.precision) == (3, 0, 8, 3, "bf16")


def test_run_options_take_the_device_of_a_model(tiny_weights: Path) -> None:
    model, _ = load_model(tiny_weights)
    assert RunOptions.resolve(model, score_chunk=7).score_chunk == 7


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"forward_batch": 0}, "forward batch must be at least 1"),
    ({"decode_workers": -1}, "decoding threads must be 0 or more"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
])
def test_run_options_refuse_bad_sizes_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        RunOptions.resolve("cpu", **kwargs)


@pytest.mark.parametrize("command", ["detect", "eval", "calibrate"])
def test_a_command_resolves_its_run_options_once_and_passes_them_down(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
) -> None:
    from conftest import IMAGES, cli

    made: list[RunOptions] = []
    real = RunOptions.resolve.__func__

    def counted(cls: type[RunOptions], *args: object, **kwargs: object) -> RunOptions:
        made.append(real(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(RunOptions, "resolve", classmethod(counted))
    images = sorted(str(p) for p in IMAGES.iterdir())
    args = {
        "detect": ["detect", *images],
        "eval": ["eval", "--id", images[0], "--id", images[1], "--ood", f"o={images[2]}", "-f", "json"],
        "calibrate": ["calibrate", "-o", str(tmp_path / "c.json"), "--alpha", "0.5", *images],
    }[command]
    result = cli(args[0], "-w", str(tiny_weights), "--classes", "cat,dog", "-b", "3", "-j", "0", *args[1:])
    assert result.returncode == 0, result.stderr
    assert len(made) == 1 and (made[0].forward_batch, made[0].decode_workers, made[0].score_chunk) == (3, 0, 3)


def test_detect_takes_a_run_options_object(tiny_weights: Path) -> None:
    import clipn_cli as clipn
    from conftest import IMAGES

    model, info = load_model(tiny_weights)
    heads = clipn.embed_classes(model, ["cat", "dog"], clipn.load_templates("clipn"), info.fingerprint)
    items = list(clipn.iter_inputs([str(IMAGES)]))
    given = [r.as_dict() for r in clipn.detect(model, heads, items, options=RunOptions.resolve(model, forward_batch=1, decode_workers=0))]
    default = [r.as_dict() for r in clipn.detect(model, heads, items)]
    assert [r["path"] for r in given] == [r["path"] for r in default] and len(given) == len(items)
