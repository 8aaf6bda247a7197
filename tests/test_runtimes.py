"""Other image-tower runtimes (README "Runtimes"): ONNX export with the weights fingerprint, and
ONNX Runtime / OpenVINO fp32 giving CTW/ATD within 1e-5 of torch fp32."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from conftest import IMAGES, cli

CLASSES = "cat,horse,rocket,coffee"
PICTURES = [str(IMAGES / name) for name in ("chelsea.png", "horse.png", "rocket.jpg", "coffee.png", "astronaut.png")]
EXACT = 1e-5  # README "Runtimes": fp32 on any runtime
INSTALLED = [r for r, module in (("onnx", "onnxruntime"), ("openvino", "openvino")) if find_spec(module) and find_spec("onnx")]
needs_onnx = pytest.mark.skipif(find_spec("onnx") is None, reason="needs the onnx extra")


def records(*args: str) -> list[dict]:
    result = cli("detect", *args, "--format", "jsonl", *PICTURES)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("runtime", INSTALLED)
def test_fp32_runtime_scores_as_torch(tiny_weights: Path, runtime: str) -> None:
    want = records("-w", str(tiny_weights), "-c", CLASSES, "--details")
    got = records("-w", str(tiny_weights), "-c", CLASSES, "--details", "--runtime", runtime)
    assert [r["path"] for r in got] == PICTURES
    for a, b in zip(got, want):
        assert a["ctw_score"] == pytest.approx(b["ctw_score"], abs=EXACT)
        assert a["atd_score"] == pytest.approx(b["atd_score"], abs=EXACT)
        assert a["p_yes"] == pytest.approx(b["p_yes"], abs=EXACT)
        assert a["class"] == b["class"]


INEXACT = 0.02  # README "Runtimes": opt-in lower precisions on the tiny official model


@pytest.mark.parametrize("args", [
    pytest.param(("--runtime", "onnx", "--quantize", "int8"), marks=pytest.mark.skipif("onnx" not in INSTALLED, reason="needs onnxruntime")),
    pytest.param(("--runtime", "openvino", "--precision", "bf16"), marks=pytest.mark.skipif("openvino" not in INSTALLED, reason="needs openvino")),
])
def test_lower_precision_runtime_within_its_bound(tiny_weights: Path, args: tuple[str, ...]) -> None:
    want = records("-w", str(tiny_weights), "-c", CLASSES)
    got = records("-w", str(tiny_weights), "-c", CLASSES, *args)
    changes = [max(abs(a["ctw_score"] - b["ctw_score"]), abs(a["atd_score"] - b["atd_score"])) for a, b in zip(got, want)]
    assert 0 < max(changes) <= INEXACT  # not the fp32 tower, and within the stated bound


@pytest.mark.skipif("onnx" not in INSTALLED, reason="needs onnxruntime")
def test_int8_export_is_cached_fingerprinted_and_cached_features_keyed_apart(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.onnx_export import read_fingerprint
    from clipn_cli.weights.checkpoints import load_model
    from clipn_cli.weights.home import weights_home

    cache = tmp_path / "features"
    fp32 = records("-w", str(tiny_weights), "-c", CLASSES, "--runtime", "onnx", "--cache", str(cache))
    int8 = records("-w", str(tiny_weights), "-c", CLASSES, "--runtime", "onnx", "--quantize", "int8", "--cache", str(cache))
    _, info = load_model(tiny_weights, device=torch.device("cpu"), text=False)
    assert read_fingerprint(weights_home() / "runtimes" / f"{info.fingerprint[:16]}-int8.onnx") == info.fingerprint
    assert [a["atd_score"] for a in int8] != [b["atd_score"] for b in fp32]  # not served the fp32 features from the cache


@needs_onnx
def test_export_writes_fingerprinted_dynamic_batch(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.onnx_export import read_fingerprint
    from clipn_cli.weights.checkpoints import load_model

    out = tmp_path / "tower.onnx"
    result = cli("export", str(tiny_weights), str(out))
    assert result.returncode == 0, result.stderr
    model, info = load_model(tiny_weights, device=torch.device("cpu"), text=False)
    assert read_fingerprint(out) == info.fingerprint
    weights = sum(p.numel() * 4 for p in model.visual.parameters())
    assert out.with_name("tower.onnx.data").stat().st_size > 0.95 * weights > 10 * out.stat().st_size  # the weights (all but the smallest) beside the graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx", "tower.onnx.data"]  # nothing staged is left
    import onnx

    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch is symbolic, not fixed
    if "onnx" in INSTALLED:
        from clipn_cli.runtimes.towers import OnnxTower

        pixels = torch.randn(3, 3, *model.visual.image_size)
        want = model.encode_image(pixels, normalize=True).detach().numpy()
        assert abs(OnnxTower(out)(pixels.numpy()) - want).max() < EXACT


@needs_onnx
def test_export_is_cached_in_the_home_and_reused(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.onnx_export import cached_export
    from clipn_cli.weights.checkpoints import load_model

    model, info = load_model(tiny_weights, device=torch.device("cpu"), text=False)
    path = cached_export(model, tmp_path / "runtimes", info.fingerprint)
    assert path == tmp_path / "runtimes" / f"{info.fingerprint[:16]}.onnx"
    stamp = path.stat().st_mtime_ns
    assert cached_export(model, tmp_path / "runtimes", info.fingerprint) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not exported again


@pytest.mark.skipif("onnx" not in INSTALLED, reason="needs onnxruntime")
def test_export_written_as_one_file_is_made_again_with_its_weights_beside(tiny_weights: Path, tmp_path: Path) -> None:
    import onnx

    from clipn_cli.runtimes.onnx_export import cached_export, export_image_tower
    from clipn_cli.runtimes.towers import OnnxTower
    from clipn_cli.weights.checkpoints import load_model

    model, info = load_model(tiny_weights, device=torch.device("cpu"), text=False)
    path = export_image_tower(model, tmp_path / "made" / "tower.onnx", info.fingerprint)
    cached = tmp_path / "runtimes" / f"{info.fingerprint[:16]}.onnx"
    cached.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(cached))  # the layout of earlier clipn: one file, weights inside
    assert cached_export(model, tmp_path / "runtimes", info.fingerprint) == cached
    assert cached.with_name(cached.name + ".data").is_file() and cached.stat().st_size < path.with_name("tower.onnx.data").stat().st_size
    pixels = torch.randn(2, 3, *model.visual.image_size)
    assert abs(OnnxTower(cached)(pixels.numpy()) - model.encode_image(pixels, normalize=True).detach().numpy()).max() < EXACT


@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("damage_kind", ["truncated", "missing", "outside", "absolute", "symlink"])
def test_damaged_cached_export_is_one_line(tiny_weights: Path, tmp_path: Path, runtime: str, damage_kind: str) -> None:
    """The graph's weights file cut short, gone (the graph alone is no cache: exported again), or
    named outside its folder (both runtimes, at the versions the extras ask for, refuse to read it):
    one line naming the file, on the torch path (--classes) and the torch-free fast start
    (--embeddings) alike."""
    import onnx

    from clipn_cli.weights.home import weights_home

    embeddings = tmp_path / "heads.safetensors"
    assert cli("embed-classes", "-w", str(tiny_weights), "-c", CLASSES, "-o", str(embeddings)).returncode == 0
    assert cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--runtime", runtime, PICTURES[0]).returncode == 0
    (cached,) = (weights_home() / "runtimes").glob("*.onnx")
    data = cached.with_name(cached.name + ".data")
    secret = tmp_path / "secret.bin"

    def damage() -> None:
        if damage_kind == "truncated":
            data.write_bytes(data.read_bytes()[:1000])
        elif damage_kind == "missing":
            data.unlink()
        else:  # the weights outside the folder, named by a relative path, an absolute one, or a symlink in it
            secret.write_bytes(data.read_bytes())
            link = cached.parent / "link.bin"
            if damage_kind == "symlink" and not link.is_symlink():
                link.symlink_to(secret)
            location = {"outside": os.path.relpath(secret, cached.parent), "absolute": str(secret), "symlink": link.name}[damage_kind]
            proto = onnx.load(str(cached), load_external_data=False)
            for tensor in proto.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location
            cached.write_bytes(proto.SerializeToString())

    for heads in (("-c", CLASSES), ("-e", str(embeddings))):
        damage()  # each path meets it (the torch path mends a missing .data by exporting again)
        result = cli("detect", "-w", str(tiny_weights), *heads, "--runtime", runtime, "--format", "jsonl", PICTURES[0])
        if damage_kind == "missing":
            assert result.returncode == 0 and json.loads(result.stdout)["path"] == PICTURES[0], result.stderr
            assert data.is_file()  # exported again by the torch path
            continue
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        name = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}[runtime]
        assert result.stderr.startswith(f"clipn: error: {cached}: {name} cannot load this export (") and result.stderr.count("\n") == 1


@pytest.mark.skipif("onnx" not in INSTALLED, reason="needs onnxruntime")
def test_export_from_other_weights_is_refused(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.runtimes.onnx_export import export_image_tower
    from clipn_cli.weights.checkpoints import load_model
    from clipn_cli.weights.home import weights_home

    model, info = load_model(tiny_weights, device=torch.device("cpu"), text=False)
    cached = weights_home() / "runtimes" / f"{info.fingerprint[:16]}.onnx"
    export_image_tower(model, cached, "0" * 64)
    result = cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--runtime", "onnx", PICTURES[0])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "exported from other weights (fingerprint 000000000000" in result.stderr
    cached.write_bytes(b"not onnx at all")
    result = cli("detect", "-w", str(tiny_weights), "-c", CLASSES, "--runtime", "onnx", PICTURES[0])
    assert result.returncode == 2 and "not an ONNX file" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (("--runtime", "tensorrt"), "--runtime must be auto, torch, onnx or openvino, not 'tensorrt'"),
    (("--runtime", "onnx", "--precision", "bf16"), "--runtime onnx computes in fp32, not --precision bf16"),
    (("--runtime", "openvino", "--precision", "fp16"), "--runtime openvino computes in fp32 or bf16, not --precision fp16"),
    (("--runtime", "openvino", "--quantize", "int8"), "--quantize int8 runs with --runtime onnx (ONNX Runtime's int8) or torch, not --runtime openvino"),
])
def test_runtime_options_refused_before_loading(args: tuple[str, ...], message: str) -> None:
    result = cli("detect", "-w", "/no/such/weights.safetensors", "-c", CLASSES, *args, PICTURES[0])
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_missing_runtime_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    result = cli("eval", "-w", "/no/such/weights.safetensors", "-c", CLASSES, "--id", str(IMAGES), "--ood", str(IMAGES), "--runtime", "onnx")
    assert result.returncode == 2
    assert "--runtime onnx needs " in result.stderr and "onnxruntime: pip install 'clipn-cli[onnx]'" in result.stderr
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    result = cli("export", "/no/such/weights.safetensors", str(IMAGES.parent / "never-written.onnx"))
    assert result.returncode == 2 and result.stderr == "clipn: error: clipn export needs onnx: pip install 'clipn-cli[onnx]'\n"


@pytest.mark.slow
@pytest.mark.parametrize("runtime", INSTALLED)
def test_vitb16_sized_fp32_runtime_scores_as_torch(runtime: str, tmp_path: Path) -> None:
    """A ViT-B-16-shaped image tower with random weights: depth and width where rounding adds up."""
    import open_clip

    from clipn_cli.model.clipn import build_model
    from clipn_cli.runtimes.towers import attach_runtime
    from clipn_cli.scores.scoring import score

    torch.manual_seed(0)
    model = build_model(open_clip.get_model_config("ViT-B-16")).eval()
    model.drop_text_towers()
    pixels = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        want_features = model.encode_image(pixels, normalize=True)
    attach_runtime(model, runtime, "fp32", tmp_path, "f" * 64)
    got_features = model.image_runtime.encode(pixels)
    yes, no = torch.nn.functional.normalize(torch.randn(2, 10, 512), dim=-1)
    want, got = score(want_features, yes, no), score(got_features, yes, no)
    assert torch.allclose(got.ctw, want.ctw, atol=EXACT, rtol=0)
    assert torch.allclose(got.atd, want.atd, atol=EXACT, rtol=0)


def odd_images() -> list[tuple[str, "object"]]:
    """The fixture images and the modes and shapes a decoder can hand over (tall, wide, tiny, exact size)."""
    from PIL import Image

    found = []
    for path in sorted(IMAGES.iterdir()):
        try:
            with Image.open(path) as image:
                image.load()
                found.append((path.name, image.copy()))
        except OSError:
            continue
    base = found[0][1].convert("RGB")
    for mode in ("L", "RGBA", "P", "1", "I", "F", "CMYK", "LA"):
        found.append((f"mode {mode}", base.convert(mode)))
    for size in ((31, 517), (517, 31), (5, 5), (224, 224), (225, 223), (3000, 224)):
        found.append((f"size {size}", base.resize(size)))
    return found


def test_numpy_preprocessing_gives_the_exact_pixels_of_the_torch_transform() -> None:
    import numpy as np

    from clipn_cli.inputs.decode import make_transform
    from clipn_cli.runtimes.preprocess import preprocess

    transform = make_transform(224)
    for name, image in odd_images():
        want = transform(image).numpy()
        got = preprocess(image, 224)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got, want), f"{name}: {np.abs(got - want).max()}"


def test_numpy_preprocessing_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys; import clipn_cli.runtimes.preprocess; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif("onnx" not in INSTALLED, reason="needs onnxruntime")
def test_calibrate_and_eval_take_the_runtime(tiny_weights: Path, tmp_path: Path) -> None:
    from clipn_cli.scores.calibration import Calibration

    files = {}
    for runtime in ("torch", "onnx"):
        files[runtime] = tmp_path / f"{runtime}.json"
        result = cli("calibrate", *PICTURES, "-w", str(tiny_weights), "-c", CLASSES, "--alpha", "0.5", "--runtime", runtime,
                     "--output", str(files[runtime]))
        assert result.returncode == 0, result.stderr
    want, got = Calibration.load(files["torch"]), Calibration.load(files["onnx"])
    for method in ("ctw", "atd"):
        assert got.scores[method] == pytest.approx(want.scores[method], abs=EXACT)
    result = cli("eval", "-w", str(tiny_weights), "-c", CLASSES, *(x for p in PICTURES[:3] for x in ("--id", p)), "--ood", f"other={PICTURES[3]}",
                 "--runtime", "onnx", "--format", "json")
    assert result.returncode == 0, result.stderr


@needs_onnx
def test_export_through_a_symlink_and_onto_a_full_disk(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a symlink the graph is written to the file it points to, and its weights beside the
    path as named, where ONNX Runtime and OpenVINO look when given that path; a full disk while
    staging is one line naming the export, and leaves nothing behind."""
    import errno

    import onnx

    real = tmp_path / "real" / "tower.onnx"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "tower.onnx"
    link.symlink_to(real)
    result = cli("export", str(tiny_weights), str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and real.stat().st_size > 3 and (tmp_path / "tower.onnx.data").is_file()
    if "onnx" in INSTALLED:
        from clipn_cli.runtimes.towers import OnnxTower

        tower = OnnxTower(link)
        assert tower(torch.zeros(2, 3, tower.image_size, tower.image_size).numpy()).shape == (2, tower.embed_dim)

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "full" / "tower.onnx"
    out.parent.mkdir()
    result = cli("export", str(tiny_weights), str(out))
    assert result.returncode == 2 and result.stderr == f"clipn: error: {out}: the disk is full (no space left on the device); nothing was written\n"
    assert list(out.parent.iterdir()) == []
