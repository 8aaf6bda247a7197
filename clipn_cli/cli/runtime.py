"""Library calls several commands share: resolving classes, weights, embeddings; progress bars."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .common import check_device, check_file, fail, info, stderr, warn

if TYPE_CHECKING:
    from ..scores.calibration import CalibratedVerdicts
    from ..heads.embeddings import ClassEmbeddings
    from ..model.clipn import CLIPN
    from ..weights.format import WeightsInfo


def load_classes(
    classes: str | None, classes_file: Path | None, embeddings: Path | None,
    sources: tuple[str, ...] = ("--classes", "--classes-file", "--embeddings"),
) -> list[str]:
    """Exactly one class source; prints warnings for duplicates and single classes.

    `sources` names them as the command spells them, so the error lists only what it accepts.
    """
    from ..heads.classes import class_warnings, parse_class_list, read_class_file

    given = [x for x in (classes, classes_file, embeddings) if x is not None]
    if len(given) != 1:
        fail(f"give exactly one of {', '.join(sources[:-1])} or {sources[-1]}")
    if embeddings is not None:
        return []
    names = parse_class_list(classes) if classes is not None else read_class_file(classes_file)  # type: ignore[arg-type]
    for message in class_warnings(names):
        warn(message)
    return names


def preflight(
    weights: Path | None, device: str, *, embeddings: Path | None = None, templates: str | None = None,
    inputs: list[str] | None = None, files: dict[str, Path | None] | None = None,
) -> None:
    """Every check that needs no torch, before torch is imported and the model loads: the device's
    spelling, the weights (name, file, $CLIPN_WEIGHTS, the default), --embeddings and the other input
    files options name, the templates, and the inputs named on the command line. A mistake costs a
    line, not the seconds a model takes to load."""
    check_device(device)
    check_file("--embeddings", embeddings)
    for option, path in (files or {}).items():
        check_file(option, path)
    check_weights(weights, embeddings)
    if templates is not None and embeddings is None:
        from ..heads.prompts import load_templates

        load_templates(templates)
    if inputs is not None:
        check_inputs(inputs)


def check_weights(weights: Path | None, embeddings: Path | None = None) -> None:
    """Resolve --weights, $CLIPN_WEIGHTS or the default as loading will, refusing a name or file that is not there."""
    from ..errors import WeightsError
    from ..weights.home import EMBEDDINGS_FORMAT, WEIGHTS_ENV, read_header, resolve_weights
    from .firstrun import interactive, should_offer

    given = str(weights) if weights is not None else os.environ.get(WEIGHTS_ENV, "")
    option = "--weights" if weights is not None else f"${WEIGHTS_ENV}"
    if not given:
        if should_offer(None, terminal=interactive()):
            return  # the first run's download offer comes when the model is loaded
        try:
            resolve_weights(None)
        except WeightsError as exc:
            if embeddings is not None:
                fail(embeddings_weights_hint(embeddings))
            fail(str(exc))
        return
    if ":" in given and not os.path.exists(given):  # MODEL:TAG or MODEL:FILE, a plain open_clip CLIP
        model, _, source = given.partition(":")
        for part in (model if model.endswith(".json") else None, source if Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors") else None):
            if part is not None and not os.path.isfile(part):
                fail(f"{option} {given}: {part}: no such file")
        return
    path = resolve_weights(given)
    if not path.exists():
        fail(f"{option} {given}: no such file, and no weights of that name ('clipn weights list' shows the names)")
    if path.is_dir():
        fail(f"{option} {given}: is a directory, not a weights file")
    if read_header(path).get("format") == EMBEDDINGS_FORMAT:
        fail(f"{path}: a class-embeddings file (from 'clipn embed-classes'), not weights: pass it as --embeddings, and give --weights the weights it was made with")


def embeddings_weights_hint(embeddings: Path) -> str:
    """The no-weights error for `--embeddings F`: F records the fingerprint of the weights that made
    it, so name those weights (when the weights home has them) and how to give them."""
    from ..weights.home import list_weights, read_header, weights_dir

    fingerprint = read_header(embeddings).get("weights_fingerprint", "")
    if not fingerprint:
        return f"no weights: give --weights with the weights {embeddings} was made with"
    named = [entry.name for entry in list_weights() if entry.fingerprint == fingerprint and entry.present]
    if named:
        return f"no weights: {embeddings} was made with the weights '{named[0]}' (fingerprint {fingerprint[:12]}): give --weights {named[0]}"
    return (f"no weights: {embeddings} was made with weights of fingerprint {fingerprint[:12]}, which are not in {weights_dir()}: "
            "give --weights FILE with the weights 'clipn embed-classes' used ('clipn weights list' shows fingerprints)")


def check_inputs(paths: list[str]) -> None:
    """Inputs named on the command line that are not there, said before the model loads.

    Each still gets its error record in the results (as `cat` reports a missing file and goes on),
    so the others are scored; when none of the inputs can exist (all named, none there, no stdin
    and no pattern), nothing would be scored: that is a usage error.
    """
    from ..inputs.sources import GLOB_CHARS

    named = [p for p in paths if p != "-" and (os.path.lexists(p) or not GLOB_CHARS & set(p))]
    missing = [p for p in named if not os.path.lexists(p)]
    if not missing:
        return
    if len(missing) == len(paths):
        more = f" (and {len(missing) - 1} more named inputs)" if len(missing) > 1 else ""
        fail(f"{missing[0]}: no such file or folder{more}")
    warn(f"{len(missing)} named input(s) do not exist, first: {missing[0]} (each gets an error record)")


def load_weights_for_cli(weights: Path | None, device: str, text: bool = True) -> tuple[CLIPN, WeightsInfo]:
    """The model on the chosen device; `text=False` (cached class embeddings) skips the text towers.

    With no weights at all, a terminal is offered the official download first (see firstrun).
    """
    from ..weights.home import EMBEDDINGS_FORMAT, read_header, resolve_weights
    from ..model.devices import resolve_device
    from ..weights.checkpoints import load_model
    from .firstrun import first_run_weights

    path = resolve_weights(first_run_weights(weights))
    if read_header(path).get("format") == EMBEDDINGS_FORMAT:
        fail(f"{path}: a class-embeddings file (from 'clipn embed-classes'), not weights: pass it as --embeddings, and give --weights the weights it was made with")
    return load_model(path, device=resolve_device(device), text=text)


def class_embeddings(
    model: CLIPN,
    weights_info: WeightsInfo,
    names: list[str],
    embeddings: Path | None,
    templates: str,
) -> ClassEmbeddings:
    """Load `--embeddings` (refusing other weights) or build heads from class names now.

    Here classes meet the model in every command: classes outside the weights' closed vocabulary
    get their one warning here.
    """
    from ..heads.classes import class_warnings
    from ..heads.embeddings import ClassEmbeddings, embed_classes, tokenizer_for, truncated_names
    from ..heads.prompts import load_templates

    if embeddings is not None:
        loaded = ClassEmbeddings.load(embeddings)
        loaded.check_weights(weights_info.fingerprint, str(embeddings), embed_dim=int(weights_info.model_cfg["embed_dim"]))
        for message in class_warnings(loaded.classes):
            warn(message)
        _warn_vocabulary(loaded.classes, weights_info)
        return loaded
    _warn_vocabulary(names, weights_info)
    template_set = load_templates(templates)
    cut = truncated_names(names, template_set, model.context_length, tokenizer_for(model))
    if cut:
        warn(f"{len(cut)} class name(s) longer than the {model.context_length}-token context are truncated, as the official tokenizer does: {cut[0][:40]!r}…")
    with text_progress(len(names) * len(template_set.templates)) as advance:
        return embed_classes(model, names, template_set, weights_info.fingerprint, progress=advance)


def _warn_vocabulary(names: list[str], weights_info: WeightsInfo) -> None:
    from ..heads.classes import vocabulary_warning

    message = vocabulary_warning(names, weights_info.vocabulary, weights_info.path.name)
    if message is not None:
        warn(message)


def parse_negatives(option: str | None, rule: str | None = None) -> tuple[str, ...]:
    """The negative-label pools asked for by `--negatives` and needed by `--rule`."""
    from ..scores.methods import BY_NAME, POOLS

    pools = [p.strip() for p in (option or "").split(",") if p.strip()]
    for pool in pools:
        if pool not in POOLS:
            fail(f"--negatives must be {' or '.join(POOLS)} (comma-separated), not '{pool}'")
    needed = BY_NAME[rule].pool if rule in BY_NAME else None
    return tuple(dict.fromkeys([*pools, *([needed] if needed else [])]))


def calibrated_verdicts(
    calibration: Path | None, alpha: float | None, fdr: float | None, rule: str, heads: ClassEmbeddings, fingerprint: str
) -> CalibratedVerdicts | None:
    """The calibrated verdict rule, with the file checked against the weights, classes and templates in use."""
    if calibration is None:
        return None
    from ..scores.calibration import CalibratedVerdicts, Calibration

    loaded = Calibration.load(calibration)
    loaded.check_matches(fingerprint, heads.classes, heads.templates_sha256, str(calibration),
                         {pool: n.digest() for pool, n in heads.negatives.items()})
    return CalibratedVerdicts(loaded, rule, loaded.alpha if alpha is None else alpha, fdr)


def add_negatives(model: CLIPN | None, weights_info: WeightsInfo, heads: ClassEmbeddings, pools: tuple[str, ...], words: Path | None, source: Path | None = None) -> None:
    """Mine the pools `heads` lacks (their candidate embeddings cached per weights in the clipn home)."""
    missing = [p for p in pools if p not in heads.negatives]
    if not missing:
        return
    if source is not None:
        fail(f"{source} holds no '{missing[0]}' negative labels: rebuild it with 'clipn embed-classes --negatives {','.join(pools)}'")
    from ..heads.wordpool import mine, read_words

    pairs = read_words(words)
    for pool in missing:
        with text_progress(len(pairs)) as advance:
            heads.negatives[pool] = mine(model, heads.classes, pool, weights_info.fingerprint, pairs, progress=advance)
        info(f"{pool}: {len(heads.negatives[pool].words)} negative labels mined")


@contextlib.contextmanager
def text_progress(total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar for text encoding on a terminal; nothing when stderr is not one."""
    if not sys.stderr.isatty() or total < 512:
        yield None
        return
    from rich.progress import Progress

    with Progress(console=stderr, transient=True) as progress:
        task = progress.add_task("encoding class prompts", total=total)
        yield lambda n: progress.advance(task, n)


def report_provenance(weights_path: Path, fingerprint: str, heads: ClassEmbeddings, **options: object) -> dict[str, object]:
    """What made an HTML report, as plain values (`report.py` imports neither torch nor the CLI):
    the weights (their name in the weights home when registered there, and the file), their
    fingerprint, the classes, clipn's version, the date (UTC, ISO 8601) and the options given
    (None: not given, left out)."""
    from datetime import datetime, timezone

    from .. import __version__
    from ..weights.home import list_weights

    named = [entry.name for entry in list_weights() if entry.fingerprint == fingerprint and entry.present] if fingerprint else []
    return {
        "weights": f"{named[0]} ({weights_path})" if named else str(weights_path),
        "weights fingerprint": fingerprint or "unknown (file from before fingerprints)",
        "classes": list(heads.classes),
        "clipn version": __version__,
        "date (UTC)": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "templates": heads.templates,
        "negative labels": ", ".join(heads.negatives) or None,
        **{name: value for name, value in options.items() if value is not None},
    }
