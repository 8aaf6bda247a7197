"""Workflow: detect without torch, for `detect --embeddings F --runtime onnx|openvino` once the image
tower's ONNX export for these weights is cached (README "Runtimes", "The torch-free fast start").

The class heads come from the embeddings file (read and checked by `heads.embeddings_file`), the
image tower from the cached export (its fingerprint read by ONNX Runtime or OpenVINO itself); images go
through the same guarded decoder with open_clip's eval transform in Pillow/NumPy
(`runtimes.preprocess`, pixel for pixel), the scores through the same formulas as torch's
(`scores.scoring` on NumPy arrays) and the records through the same `detections_from_scores`. A
run this path does not take (`FastStart.open` returns None) goes the torch way, which gives the
same records. Importing this module imports no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import WeightsError
from .heads.embeddings_file import StoredEmbeddings, check_made_with, read_embeddings
from .inputs.decode import LoadedImage, load_images
from .inputs.sources import InputItem
from .model.devices import MIN_PREFETCH, default_decode_workers, default_forward_batch
from .outputs.records import Detection, detections_from_scores
from .runtimes import export_path, is_cached
from .runtimes.preprocess import preprocess
from .runtimes.sessions import OnnxTower, OpenVinoTower
from .scores.methods import check_rule
from .scores.scoring import Heads, score_heads, unit
from .weights.home import FORMAT, VOCABULARY, read_header, resolve_weights, weights_home

# Up to this many images, skipping ONNX Runtime's weight prepacking saves more at the start (0.4 s on
# a ViT-B-16) than it costs per image (5-8%, ~0.015 s): measured on the 2-core AMD EPYC of README "Runtimes".
FEW_IMAGES = 16
_CPU = SimpleNamespace(type="cpu")  # what the device defaults read of a device (`.type`), without torch


@dataclass(frozen=True)
class FastStart:
    """What a torch-free run holds: the weights' file and vocabulary, the class heads, the exported tower."""

    weights: Path
    vocabulary: tuple[str, ...] | None
    embeddings: StoredEmbeddings
    heads: Heads
    tower: OnnxTower | OpenVinoTower

    @classmethod
    def open(cls, weights: str | os.PathLike[str] | None, embeddings: Path, runtime: str = "onnx", few: bool = False) -> FastStart | None:
        """The fast start for these weights and embeddings in `runtime` (onnx or openvino, fp32 on the
        CPU), or None when the torch path must run. `few`: a run of at most `FEW_IMAGES` images, for
        which ONNX Runtime opens faster without repacking its weights (`OnnxTower`).

        None: weights that resolve to nothing here or are no clipn weights file with a fingerprint
        (the torch path says why, or offers the first-run download), embeddings holding negative
        labels (scored in torch), no cached export for these weights, or an export made from other
        ones. Embeddings made with other weights are refused here, in the torch path's words.
        """
        found = weights_export(weights)
        if found is None or not is_cached(found[2]):
            return None
        path, meta, export = found
        fingerprint, vocabulary = meta["fingerprint"], _vocabulary(meta)
        if vocabulary is False:
            return None
        stored = read_embeddings(embeddings)
        if stored.pools:
            return None
        tower = OnnxTower(export, prepack=not few) if runtime == "onnx" else OpenVinoTower(export)
        if tower.fingerprint != fingerprint:
            return None
        check_made_with(stored.weights_fingerprint, stored.text_yes.shape[1], fingerprint, str(embeddings), tower.embed_dim)
        heads = Heads(unit(stored.text_yes), unit(stored.text_no), {})
        return cls(path, vocabulary, stored, heads, tower)  # type: ignore[arg-type]

    def detect(
        self, items: Iterable[InputItem], rule: str = "atd", *, threshold: float | None = None, details: bool = False,
        top_k: int = 0, exif_transpose: bool = False, draft: bool = False, batch_size: int | None = None, workers: int | None = None,
    ) -> Iterator[Detection]:
        """One Detection per input, in input order, as `detection.detect` gives them on the CPU."""
        check_rule(rule, (), threshold)  # before any image is read
        batch = batch_size or default_forward_batch(_CPU)
        workers = default_decode_workers(_CPU) if workers is None else workers
        size = self.tower.image_size
        loaded = load_images(items, lambda image: preprocess(image, size), workers=workers, exif_transpose=exif_transpose,
                             prefetch=max(2 * batch, MIN_PREFETCH), draft=2 * size if draft else 0)
        pending: list[LoadedImage] = []
        for image in loaded:
            pending.append(image)
            if sum(p.pixels is not None for p in pending) >= batch:
                yield from self._score(pending, rule, threshold, details, top_k)
                pending = []
        yield from self._score(pending, rule, threshold, details, top_k)

    def _score(self, batch: list[LoadedImage], rule: str, threshold: float | None, details: bool, top_k: int) -> Iterator[Detection]:
        good = [b for b in batch if b.pixels is not None]
        results: Iterator[Detection] = iter(())
        if good:
            features = self.tower(np.stack([b.pixels for b in good]))
            scores = score_heads(features, self.heads)
            results = iter(detections_from_scores([b.path for b in good], scores, self.embeddings.classes, rule, details, top_k, threshold))
        for b in batch:
            yield next(results) if b.pixels is not None else Detection(path=b.path, error=b.error)


def weights_export(weights: str | os.PathLike[str] | None) -> tuple[Path, dict[str, str], Path] | None:
    """(weights file, its metadata, where its cached ONNX export lives), without loading a tensor;
    None for weights that resolve to nothing here or are no clipn weights file with a fingerprint."""
    try:
        path = resolve_weights(weights)
    except WeightsError:
        return None
    meta = read_header(path) if path.is_file() else {}
    if meta.get("format") != FORMAT or meta.get("format_version", "1") != "1" or not meta.get("fingerprint"):
        return None
    return path, meta, export_path(weights_home() / "runtimes", meta["fingerprint"])


def _vocabulary(meta: dict[str, str]) -> tuple[str, ...] | None | bool:
    """The weights' closed vocabulary (None: open); False when damaged (the torch path refuses it)."""
    if VOCABULARY not in meta:
        return None
    try:
        names = json.loads(meta[VOCABULARY])
    except ValueError:
        return False
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
        return False
    return tuple(names)
