"""The exactness claims behind the speed-ups (issue 7), proved on the tiny official fixture.

- Text prompts sorted by length and cut to each batch's longest give the embeddings of the
  official computation at the full 77 tokens (causal mask + pooling at the end-of-text token).
- Decoding in threads yields exactly what decoding in the main thread yields, in input order,
  error records included.
- The weights' NaN/Inf check that reads the file in chunks finds what the in-memory one finds.
- The opt-in speed-ups (--draft, --quantize int8) stay off by default and stay close when on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import GROUPING_COSINE, OFFICIAL_CHECKPOINT, TINY_CONFIG, cli

from clipn_cli.heads.embeddings import embed_classes, encode_texts, tokenizer_for
from clipn_cli.errors import ClipnError, WeightsError
from clipn_cli.inputs.decode import load_images, make_transform, open_image
from clipn_cli.inputs.sources import InputItem, iter_inputs
from clipn_cli.model.devices import pipeline_sizes
from clipn_cli.model.encode import encode_images
from clipn_cli.heads.prompts import load_templates
from clipn_cli.weights.fixedpoint import SCALE_SUFFIX, pack, split_scales, unpack
from clipn_cli.model.clipn import is_text_key
from clipn_cli.safetensors_file import SafetensorsFile
from clipn_cli.weights.checkpoints import check_finite_file, convert_checkpoint, load_model

LONG_NAME = " ".join(["extraordinarily"] * 40)  # beyond the 77-token context: cut as the official tokenizer cuts
CLASSES = ["cat", "great white shark", "a very long and complicated class name with many words", LONG_NAME]


def reference_features(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official computation: all 77 positions, causal mask, pooling at the end-of-text token.

    "yes" is open_clip's own CLIP.encode_text; "no" is the same steps with the "no" tower and the
    mean of the 16 prompts added at every position (official model.py, eval mode).
    """
    assert model.attn_mask.shape == (77, 77)
    yes = open_clip.model.CLIP.encode_text(model, tokens, normalize=True)
    x = model.token_embedding_no(tokens) + model.positional_embedding_no + model.prompt_no.mean(dim=0)
    x = model.ln_final_no(model.transformer_no(x, attn_mask=model.attn_mask))
    x = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ model.text_projection_no
    return yes, F.normalize(x, dim=-1)


@torch.inference_mode()
def test_truncated_sorted_text_encoding_equals_77_tokens(tiny_model) -> None:
    templates = load_templates("clipn")
    tokens = tokenizer_for(tiny_model)([t for c in CLASSES for t in templates.texts(c)])
    lengths = tokens.argmax(dim=-1) + 1
    assert lengths.min() < 15 and lengths.max() == 77  # short prompts are really cut; the long name fills the context
    ref_yes, ref_no = reference_features(tiny_model, tokens)
    yes, no = encode_texts(tiny_model, tokens, batch_size=7)  # many length-sorted batches, out of input order
    assert (yes - ref_yes).abs().max() <= 1e-5
    assert (no - ref_no).abs().max() <= 1e-5
    assert (ref_yes - ref_no).abs().max() > 1e-2  # the two towers differ, so the "no" check is not the "yes" one again


@torch.inference_mode()
def test_class_heads_equal_77_token_ensemble(tiny_model) -> None:
    templates = load_templates("clipn")
    heads = embed_classes(tiny_model, CLASSES, templates, "fp")
    ref_yes, ref_no = reference_features(tiny_model, tokenizer_for(tiny_model)([t for c in CLASSES for t in templates.texts(c)]))
    shape = (len(CLASSES), len(templates.templates), -1)
    assert (heads.text_yes - F.normalize(ref_yes.view(shape).sum(1), dim=-1)).abs().max() <= 1e-5
    assert (heads.text_no - F.normalize(ref_no.view(shape).sum(1), dim=-1)).abs().max() <= 1e-5


@torch.inference_mode()
def test_class_heads_built_in_chunks_equal_one_pass(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipn_cli.heads.embeddings as embeddings

    templates = load_templates("clipn")
    whole = embed_classes(tiny_model, CLASSES, templates, "fp")
    monkeypatch.setattr(embeddings, "CHUNK_PROMPTS", 3 * len(templates.templates) + 5)  # chunks of 3 classes, then 1
    seen: list[int] = []
    chunked = embed_classes(tiny_model, CLASSES, templates, "fp", batch_size=64, progress=seen.append)
    assert chunked.classes == CLASSES
    assert sum(seen) == len(CLASSES) * len(templates.templates)
    assert (chunked.text_yes - whole.text_yes).abs().max() <= GROUPING_COSINE  # README: Reproducibility
    assert (chunked.text_no - whole.text_no).abs().max() <= GROUPING_COSINE
    assert (whole.text_yes[0] - whole.text_yes[1]).abs().max() > 1e-2  # rows are distinct, so a mix-up would show


@pytest.fixture
def mixed_inputs(images_dir: Path, tmp_path: Path) -> list[InputItem]:
    """Good images with every kind of failure between them."""
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((images_dir / "rocket.jpg").read_bytes()[:600])
    good = list(iter_inputs([str(images_dir)]))
    bad = [InputItem(str(tmp_path / "missing.png")), InputItem(str(not_image)), InputItem(str(truncated)),
           InputItem(str(tmp_path)), InputItem("*.nothing", error="no file matches this pattern")]
    items = []
    for i, item in enumerate(good * 2):
        items.append(item)
        if i % 3 == 1:
            items.append(bad[i % len(bad)])
    return items


@pytest.mark.parametrize(("workers", "prefetch"), [(1, 1), (3, 2), (4, 64)])
def test_parallel_loading_matches_sequential(mixed_inputs: list[InputItem], workers: int, prefetch: int) -> None:
    transform = make_transform(224)
    sequential = list(load_images(mixed_inputs, transform, workers=0))
    parallel = list(load_images(iter(mixed_inputs), transform, workers=workers, prefetch=prefetch))
    assert [r.path for r in parallel] == [i.path for i in mixed_inputs]
    assert sum(r.error is not None for r in sequential) >= 5
    for seq, par in zip(sequential, parallel, strict=True):
        assert seq.error == par.error
        assert (seq.pixels is None) == (par.pixels is None)
        if seq.pixels is not None:
            assert torch.equal(seq.pixels, par.pixels)


def test_parallel_encoding_matches_sequential(tiny_model, mixed_inputs: list[InputItem]) -> None:
    sequential = list(encode_images(tiny_model, mixed_inputs, batch_size=5, workers=0))
    parallel = list(encode_images(tiny_model, mixed_inputs, batch_size=5, workers=3))
    assert [e.path for e in parallel] == [i.path for i in mixed_inputs]
    for seq, par in zip(sequential, parallel, strict=True):
        assert seq.error == par.error
        if seq.feature is not None:
            assert torch.equal(seq.feature, par.feature)


def test_library_uses_the_devices_pipeline_defaults(tiny_model, images_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipn_cli.model.devices as devices
    import clipn_cli.model.encode as inference
    from clipn_cli.detection import detect

    assert pipeline_sizes(tiny_model) == (12, min(4, os.cpu_count() or 1))  # what `clipn detect` uses on a CPU
    assert pipeline_sizes(tiny_model, 5, 0) == (5, 0)  # 0 threads (decode in the caller's thread) is a choice, not "unset"
    monkeypatch.setattr(devices, "default_forward_batch", lambda device: 5)
    sizes: list[int] = []
    real = inference.encode_batch
    monkeypatch.setattr(inference, "encode_batch", lambda m, pixels, *a, **k: sizes.append(len(pixels)) or real(m, pixels, *a, **k))
    heads = embed_classes(tiny_model, ["cat", "rocket"], load_templates("simple"), "fp")
    results = list(detect(tiny_model, heads, iter_inputs([str(images_dir)])))
    assert len(results) == 12 and sizes == [5, 5, 2]


def test_draft_is_off_by_default_and_only_shrinks_large_jpegs(images_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    with Image.open(images_dir / "chelsea.png") as img:
        img.convert("RGB").resize((2000, 1500)).save(big, quality=90)
    full, drafted = open_image(str(big)), open_image(str(big), draft=448)
    assert full.size == (2000, 1500)
    assert drafted.size == (1000, 750)  # the largest JPEG scale (1/2) keeping both sides ≥ 448
    png = images_dir / "coffee.png"
    assert open_image(str(png), draft=448).tobytes() == open_image(str(png)).tobytes()
    transform = make_transform(224)
    exact = transform(full)
    assert torch.equal(transform(open_image(str(big))), exact)
    assert 0 < (transform(drafted) - exact).abs().mean() < 0.02


def test_finite_check_reads_the_file_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tensors = {"a": torch.randn(100_000).to(dtype), "b": torch.arange(10), "c": torch.full((1000,), 60000.0).to(dtype)}
        save_file(tensors, str(path))
        check_finite_file(SafetensorsFile(path), chunk_bytes=4096)  # finite, though c's fp16 sum overflows
        tensors["a"][-1] = float("nan")
        save_file(tensors, str(path))
        with pytest.raises(WeightsError, match=r"w\.safetensors: tensor 'a' contains NaN or Inf"):
            check_finite_file(SafetensorsFile(path), chunk_bytes=4096)


def test_load_model_refuses_inf_in_the_no_tower(tiny_weights: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_weights), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(tiny_weights))
    tensors["transformer_no.resblocks.1.mlp.c_proj.weight"][0, 0] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(WeightsError, match="transformer_no.resblocks.1.mlp.c_proj.weight' contains NaN or Inf"):
        load_model(bad)


def test_image_only_model_encodes_images_exactly_and_holds_no_text_tower(tiny_weights: Path, images_dir: Path, tmp_path: Path) -> None:
    half = tmp_path / "tiny-fp16.safetensors"
    convert_checkpoint(OFFICIAL_CHECKPOINT, half, str(TINY_CONFIG), dtype="fp16")
    for path in (tiny_weights, half):
        full, info = load_model(path)
        image_only, info_image = load_model(path, text=False)
        assert info_image.fingerprint == info.fingerprint
        assert image_only.has_text is False and full.has_text is True
        keys = set(image_only.state_dict())
        assert keys == {k for k in full.state_dict() if not is_text_key(k)} and len(keys) < len(full.state_dict())
        assert all(p.dtype == torch.float32 for p in image_only.parameters())
        inputs = list(iter_inputs([str(images_dir)]))
        with torch.inference_mode():
            a = torch.stack([e.feature for e in encode_images(full, inputs)])
            b = torch.stack([e.feature for e in encode_images(image_only, inputs)])
        assert torch.equal(a, b)
        tokens = tokenizer_for(full)(["a cat"])
        with pytest.raises(ClipnError, match="without its text towers"):
            image_only.encode_text_no(tokens)
        with pytest.raises(ClipnError, match="without its text towers"):
            embed_classes(image_only, ["cat"], load_templates("simple"), info.fingerprint)


def test_image_only_loading_still_checks_the_text_towers(tiny_weights: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_weights), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(tiny_weights))
    tensors["prompt_no"][0, 0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(WeightsError, match="'prompt_no' contains NaN or Inf"):
        load_model(bad, text=False)
    del tensors["prompt_no"]
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(WeightsError, match="missing tensor 'prompt_no'"):
        load_model(bad, text=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda cfg: cfg["vision_cfg"].update(layers="three"), "vision_cfg.layers must be a positive number, not 'three'"),
        (lambda cfg: cfg["text_cfg"].update(width=-8), "text_cfg.width must be a positive number"),
        (lambda cfg: cfg.update(embed_dim=1.5), "embed_dim must be a positive integer"),
        (lambda cfg: cfg.update(vision_cfg=[1, 2]), "vision_cfg must be a mapping"),
    ],
)
def test_damaged_model_config_in_weights_is_refused_with_the_file(tiny_weights: Path, tmp_path: Path, change, message: str) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_weights), framework="pt") as fh:
        meta = dict(fh.metadata())
    cfg = json.loads(meta["model_config"])
    change(cfg)
    meta["model_config"] = json.dumps(cfg)
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(tiny_weights)), str(bad), metadata=meta)
    with pytest.raises(ClipnError, match=re.escape(f"{bad}: {message}")):
        load_model(bad)


def test_int16_fixed_point_rounds_each_value_to_its_row_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 3, 5, generator=gen) * torch.logspace(-6, 2, 64)[:, None, None], "zero": torch.zeros(2, 4),
               "bias": torch.randn(7, generator=gen), "count": torch.arange(3)}
    packed = pack(tensors)
    assert packed["w"].dtype == torch.int16 and packed["bias"].dtype == torch.float32 and torch.equal(packed["count"], tensors["count"])
    with pytest.raises(WeightsError, match="mem: tensor 'count' is torch.int64 without a scale"):
        split_scales(packed, "mem")  # a model's tensors are all floating point
    del packed["count"], tensors["count"]
    values, scales = split_scales(packed, "mem")
    assert set(scales) == {"w", "zero"}
    restored = {k: unpack(v, scales.get(k)) for k, v in values.items()}
    row_peak = tensors["w"].abs().amax(dim=(1, 2), keepdim=True)
    step = row_peak / 32767
    assert ((restored["w"] - tensors["w"]).abs() <= step / 2 + row_peak * 2**-22).all()  # half a step of its row's scale, + fp32 rounding
    assert torch.equal(restored["zero"], tensors["zero"]) and torch.equal(restored["bias"], tensors["bias"])


def test_int16_files_load_strictly(tiny_weights: Path, images_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "tiny-int16.safetensors"
    convert_checkpoint(OFFICIAL_CHECKPOINT, path, str(TINY_CONFIG), dtype="int16")
    full, _ = load_model(tiny_weights)
    for text in (True, False):
        model, _ = load_model(path, text=text)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        inputs = list(iter_inputs([str(images_dir / "chelsea.png")]))
        with torch.inference_mode():
            a, b = next(encode_images(full, inputs)).feature, next(encode_images(model, inputs)).feature
        assert (a - b).abs().max() < 1e-4
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    broken = tmp_path / "broken.safetensors"
    for change, message in (
        (lambda t: t.pop(key + SCALE_SUFFIX), f"tensor '{key}' is torch.int16 without a scale"),
        (lambda t: t.update({key + SCALE_SUFFIX: t[key + SCALE_SUFFIX][:-1]}), f"scale of '{key}' is torch.float32"),
        (lambda t: t.update({"nonsense" + SCALE_SUFFIX: torch.ones(1, 1)}), "scale 'nonsense:int16_scale' has no int16 tensor"),
        (lambda t: t[key + SCALE_SUFFIX].__setitem__((0, 0), float("nan")), f"'{key + SCALE_SUFFIX}' contains NaN"),
    ):
        damaged = dict(tensors)
        damaged[key + SCALE_SUFFIX] = tensors[key + SCALE_SUFFIX].clone()
        change(damaged)
        save_file(damaged, str(broken), metadata=meta)
        with pytest.raises(WeightsError, match=re.escape(message)):
            load_model(broken)


def detect_records(*args: str) -> list[dict]:
    result = cli("detect", *args, "-f", "jsonl")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_quantize_and_draft_options_stay_close(tiny_weights: Path, images_dir: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "astronaut.png", "coffee.png"):
        with Image.open(images_dir / name) as img:
            img.convert("RGB").resize((1600, 1200)).save(photos / name.replace(".png", ".jpg"), quality=90)
    shutil.copy(images_dir / "rocket.jpg", photos / "rocket.jpg")
    common = ("-w", str(tiny_weights), "--classes", "cat,rocket,coffee", "--templates", "simple", str(photos))
    exact = detect_records(*common)
    for option in (("--draft",), ("--quantize", "int8")):
        fast = detect_records(*common, *option)
        assert [r["path"] for r in fast] == [r["path"] for r in exact]
        changed = max(abs(a[k] - b[k]) for a, b in zip(exact, fast) for k in ("ctw_score", "atd_score", "p_ood"))
        assert 0 < changed < 0.05, (option, changed)


def test_unknown_quantization_is_a_usage_error(tiny_weights: Path, images_dir: Path) -> None:
    result = cli("detect", "-w", tiny_weights, "--classes", "cat", "--quantize", "int4", images_dir)
    assert result.returncode == 2
    assert "--quantize must be int8" in result.stderr


def test_detect_asks_for_huge_pages_unless_the_user_chose(tiny_weights: Path, images_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["-w", str(tiny_weights), "--classes", "cat", str(images_dir / "rocket.jpg")]
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "placeholder")  # so that monkeypatch restores the environment
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert len(detect_records(*args)) == 1
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    detect_records(*args)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
