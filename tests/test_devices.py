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
