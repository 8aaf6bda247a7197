"""CLIPN weights: converting official checkpoints, writing and loading our safetensors format.

Our format is a safetensors file whose tensors carry the official names (no `module.` prefix)
and whose metadata carries everything needed to rebuild the model: the open_clip model config,
the number of "no" prompts, a fingerprint of the tensors and where they came from. The format
itself (metadata, checks, fingerprints, reading `.pt` safely) lives in `format.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipnError, WeightsError
from ..files import atomic_path, sha256_file
from ..model.clipn import CLIPN, build_model, causal_mask, is_text_key
from ..model.configs import infer_config, resolve_config, validate_config
from ..model.devices import resolve_device
from ..safetensors_file import SafetensorsError, SafetensorsFile, loads_json
from .fixedpoint import pack, split_scales, unpack
from .format import (
    DTYPES,
    FORMAT_VERSION,
    MAX_PROMPTS,
    MAX_VOCABULARY,
    STORAGE_DTYPES,
    VOCABULARY,
    WeightsInfo,
    _all_finite,
    _first_line,
    check_tensors,
    fingerprint,
    read_checkpoint,
)
from .home import FORMAT, resolve_weights


def check_finite_file(sf: SafetensorsFile, chunk_bytes: int = 1 << 24) -> None:
    """NaN/Inf check of an open safetensors file read in chunks instead of through its memory map.

    Reading leaves the map untouched, so a run pages in only the tensors it uses: `detect` with
    cached class embeddings never faults in the two text towers (60% of ViT-B-16's weights).
    """
    buffer = bytearray(chunk_bytes)
    for key, entry in sorted(sf.entries.items(), key=lambda item: item[1].start):
        if not entry.dtype.is_floating_point:
            continue
        step = chunk_bytes - chunk_bytes % entry.dtype.itemsize
        for offset in range(entry.start, entry.end, step):
            got = sf.readinto(memoryview(buffer)[: min(step, entry.end - offset)], offset)
            if not _all_finite(torch.frombuffer(buffer, dtype=entry.dtype, count=got // entry.dtype.itemsize)):
                raise WeightsError(f"{sf.path}: tensor '{key}' contains NaN or Inf values")


def save_weights(
    tensors: dict[str, torch.Tensor],
    out: str | os.PathLike[str],
    model_cfg: dict[str, Any],
    model_name: str = "",
    extra_metadata: dict[str, str] | None = None,
) -> WeightsInfo:
    """Write tensors and their metadata as our safetensors format; the file appears atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    num_prompts = int(tensors["prompt_no"].shape[0])
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(model_cfg, sort_keys=True),
        "model_name": model_name,
        "num_prompts": str(num_prompts),
        "fingerprint": fingerprint(tensors),
        **(extra_metadata or {}),
    }
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return WeightsInfo(Path(out), dict(model_cfg), model_name, num_prompts, meta["fingerprint"], meta)


def cast_for_storage(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Tensors as a file of this storage dtype holds them; `load_model` turns any of them into fp32."""
    if dtype == "int16":
        return pack(tensors)
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}


def convert_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: str | None = None,
    dtype: str = "fp32",
    extra_metadata: dict[str, str] | None = None,
) -> WeightsInfo:
    """Official `.pt` checkpoint (or bare state dict) → our safetensors, checked strictly.

    The architecture comes from `config` (open_clip name or JSON file) or, without it, from
    matching the tensor shapes against open_clip's bundled configs. Optimizer state is dropped.
    """
    if dtype not in STORAGE_DTYPES:
        raise ClipnError(f"unknown dtype '{dtype}': choose one of {', '.join(STORAGE_DTYPES)}")
    tensors = read_checkpoint(src)
    if "prompt_no" not in tensors:
        raise WeightsError(f"{src}: no 'prompt_no' tensor: this is not a CLIPN checkpoint (plain CLIP or hand-crafted variant?)")
    num_prompts = int(tensors["prompt_no"].shape[0])
    if config is None:
        model_name, model_cfg = infer_config({k: tuple(v.shape) for k, v in tensors.items()}, num_prompts)
    else:
        model_cfg = resolve_config(config)
        model_name = config if not Path(config).is_file() else Path(config).stem
    check_tensors(tensors, model_cfg, num_prompts, str(src))
    cast = cast_for_storage(tensors, dtype)
    extra = {"source_name": Path(src).name, "source_sha256": sha256_file(src), "dtype": dtype, **(extra_metadata or {})}
    return save_weights(cast, out, model_cfg, model_name, extra)


def open_weights(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Open a weights file once (header checked); refuse what is not a safetensors file, naming it."""
    path = Path(path)
    try:
        return SafetensorsFile(path)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, not a weights file") from None
    except (SafetensorsError, OSError) as exc:
        hint = " (an official .pt checkpoint? run 'clipn convert' first)" if path.suffix in {".pt", ".pth", ".bin"} else ""
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise WeightsError(f"{path}: not a valid safetensors file: {detail}{hint}") from None


def _json_or_none(text: str) -> Any:
    try:
        return loads_json(text, "metadata", max_depth=2)
    except SafetensorsError:
        return None


def read_info(path: str | os.PathLike[str]) -> WeightsInfo:
    """Read a weights file's metadata (no tensors loaded); refuse anything that is not our format."""
    with open_weights(path) as sf:
        return info_of(sf)


def info_of(sf: SafetensorsFile) -> WeightsInfo:
    """The WeightsInfo of an open weights file, its metadata validated before anything is built."""
    path, meta = sf.path, sf.metadata
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a clipn-cli weights file (no '{FORMAT}' metadata); convert it with 'clipn convert'")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise WeightsError(f"{path}: weights format version {meta['format_version'][:20]} is not one this clipn-cli reads ({FORMAT_VERSION}); a newer clipn-cli may read it")
    try:
        model_cfg = validate_config(loads_json(meta["model_config"], "model_config metadata"), str(path))
        num_prompts = int(meta["num_prompts"])
    except KeyError as exc:
        raise WeightsError(f"{path}: damaged metadata (no {exc})") from None
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: damaged metadata ({_first_line(exc)})") from None
    if not 1 <= num_prompts <= MAX_PROMPTS:
        raise WeightsError(f"{path}: damaged metadata (num_prompts {num_prompts} is not from 1 to {MAX_PROMPTS})")
    if "prompt_no" not in sf.entries:
        raise WeightsError(f"{path}: missing tensor 'prompt_no'")
    if VOCABULARY in meta:
        names = _json_or_none(meta[VOCABULARY])
        if not (isinstance(names, list) and 0 < len(names) <= MAX_VOCABULARY and all(isinstance(n, str) and n.strip() for n in names)):
            raise WeightsError(f"{path}: damaged metadata ({VOCABULARY} is not a list of 1 to {MAX_VOCABULARY} class names)")
    return WeightsInfo(path, model_cfg, meta.get("model_name", ""), num_prompts, meta.get("fingerprint", ""), meta)


def _fp32_state(values: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors as fp32. An all-fp32 file's tensors stay views of its memory map (pages
    load on use); if anything had to be converted, the rest is copied too, so that no view keeps
    the map, and the 16-bit pages read during conversion, resident."""
    state = {k: unpack(v, scales.get(k)) for k, v in values.items()}
    if all(state[k] is values[k] for k in state):
        return state
    return {k: v.clone() if v is values[k] else v for k, v in state.items()}


def load_model(
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    text: bool = True,
) -> tuple[CLIPN, WeightsInfo]:
    """Load a CLIPN in eval mode, fp32, from our safetensors format (any storage dtype): strict, checked, memory-mapped.

    The model is built on the `meta` device and the file's tensors are assigned in place, so
    no time is spent on a random initialisation that would be thrown away. `text=False` loads
    the image side only (see `CLIPN.drop_text_towers`); the whole file is still checked.
    `device` is resolved as the CLI's --device is: `auto` picks CUDA, MPS or the CPU, and a device
    that is misspelt or absent is a `DeviceError`.
    """
    from .plainclip import load_plain_clip, parse_spec

    device = resolve_device(device)
    if (plain := parse_spec(weights)) is not None:  # `MODEL:TAG` / `MODEL:FILE`: a plain open_clip CLIP
        return load_plain_clip(plain, device)
    with open_weights(resolve_weights(weights)) as sf:
        return model_from_file(sf, device, text)


def model_from_file(sf: SafetensorsFile, device: str | torch.device = "cpu", text: bool = True) -> tuple[CLIPN, WeightsInfo]:
    """`load_model` for a weights file already open: metadata and tensors come from this one descriptor."""
    info = info_of(sf)
    try:
        tensors = sf.tensors()
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{info.path}: cannot read tensors: {_first_line(exc)}") from None
    values, scales = split_scales(tensors, str(info.path))
    check_tensors(values, info.model_cfg, info.num_prompts, str(info.path), finite=False)
    check_finite_file(sf)
    if not info.fingerprint:
        info = WeightsInfo(info.path, info.model_cfg, info.model_name, info.num_prompts, fingerprint(tensors), info.metadata)
    model = build_model(info.model_cfg, info.num_prompts, device="meta")
    if not text:
        model.drop_text_towers()
        values = {k: v for k, v in values.items() if not is_text_key(k)}
    del tensors
    model.load_state_dict(_fp32_state(values, scales), strict=True, assign=True)
    model.attn_mask = causal_mask(model.context_length)
    return model.to(device).eval(), info
