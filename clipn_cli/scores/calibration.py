"""Split-conformal calibration: turn any "higher = more ID" score into a verdict whose ID
false-alarm rate is at most a chosen α, and Benjamini–Hochberg control for batches.

With n calibration scores c_1..c_n from images known to be ID, a new image with score s gets

    p = (1 + #{i : c_i <= s}) / (n + 1)

and is called OOD when p <= α. If the new image is ID and exchangeable with the calibration
images, P(p <= α) <= α whatever the score's distribution (ties counted against OOD, which only
makes p larger). The smallest p possible is 1 / (n + 1), so α below that can never flag anything:
it needs n + 1 >= 1 / α calibration images.

Pure numpy, no model: the CLI scores images and hands the numbers here. A `Calibration` file
stores the sorted scores of every method plus what they are valid for (weights, classes,
templates); it holds no image path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import methods
from ..errors import CalibrationError
from ..files import FileTooLargeError, JSONLimitError, JSONLimits, NotRegularFileError, atomic_open, read_json
from ..jsonsafe import json_text

FORMAT = "clipn-cli.calibration"
FORMAT_VERSION = "1"
MAX_FILE_BYTES = 256 << 20  # ~2x10^6 calibration images x 6 methods; parsing more would cost GBs of memory
# what the largest such file holds, counted on its text before parsing (`files.check_json`): 12 million
# scores cost about 400 MB parsed; a 24 MB list of 12 million small values in an extra key is refused
JSON_LIMITS = JSONLimits(values=12_000_000, containers=10_000)
KEYS = frozenset({"format", "format_version", "score_direction", "count", "alpha", "weights_fingerprint", "classes",
                  "templates", "templates_sha256", "settings", "negatives", "scores"})
DEFAULT_ALPHA = 0.05
# the record field holding each method's score ("higher = more ID"), for `detect --calibration`:
# the methods of the table that need no negative labels and are written to records
RECORD_FIELDS = {m.name: m.record for m in methods.TABLE if m.record is not None}


def p_values(calibration_scores: np.ndarray, scores: np.ndarray | Sequence[float] | float) -> np.ndarray:
    """Conformal p-values (1 + #{c <= s}) / (n + 1) of `scores` against sorted calibration scores."""
    calib = np.asarray(calibration_scores, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(calib, s, side="right")  # counts c <= s: ties go against OOD
    return (1.0 + below) / (calib.size + 1.0)


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration images for which p <= α is possible: n + 1 >= 1/α."""
    check_alpha(alpha)
    # (n + 1) α >= 1, with a hair of tolerance so that 1/0.05 is 20, not 20.000000000000004
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def check_alpha(alpha: float, option: str = "--alpha") -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise CalibrationError(f"{option} must be between 0 and 1 (exclusive), not {alpha}")


def check_size(n: int, alpha: float, source: str = "calibration") -> None:
    """Refuse an α the calibration set is too small for: no image could ever be flagged."""
    need = min_calibration_size(alpha)
    if n < need:
        raise CalibrationError(
            f"{source}: {n} calibration images are too few for alpha {alpha:g}: "
            f"at least {need} are needed (n + 1 >= 1/alpha); calibrate on more ID images or choose a larger alpha"
        )


def benjamini_hochberg(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """BH-adjusted p-values (q-values): flag q <= Q to keep the expected share of ID among flagged <= Q.

    q_(i) = min over j >= i of m p_(j) / j (sorted ascending, capped at 1). `q <= Q` flags exactly
    the images the BH step-up procedure at level Q rejects (valid for independent or positively
    dependent p-values; conformal p-values sharing one calibration set are positively dependent).
    """
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="mergesort")
    ranked = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(adjusted, 1.0)
    return q


@dataclass
class Calibration:
    """Sorted ID scores of every method, tied to the weights, classes and templates that made them."""

    scores: dict[str, np.ndarray]
    weights_fingerprint: str
    classes: list[str]
    templates: str
    templates_sha256: str
    alpha: float = DEFAULT_ALPHA
    settings: dict[str, Any] = field(default_factory=dict)
    negatives: dict[str, str] = field(default_factory=dict)  # pool -> digest of its words (NegativePool.digest)

    def __post_init__(self) -> None:
        self.scores = {m: np.sort(np.asarray(v, dtype=np.float64).reshape(-1)) for m, v in self.scores.items()}

    @property
    def count(self) -> int:
        return min((v.size for v in self.scores.values()), default=0)

    def p_values(self, method: str, scores: np.ndarray | Sequence[float] | float) -> np.ndarray:
        if method not in self.scores:
            pool = methods.BY_NAME[method].pool if method in methods.BY_NAME else None
            how = f"; make one with 'clipn calibrate --negatives {pool}'" if pool else ""
            raise CalibrationError(f"calibration has no '{method}' scores (it has {', '.join(m[:40] for m in list(self.scores)[:10])}){how}")
        return p_values(self.scores[method], scores)

    def threshold(self, method: str, alpha: float) -> float:
        """The score below which p <= α: the k-th smallest calibration score, k = floor(α(n + 1))."""
        check_size(self.count, alpha)
        k = math.floor(alpha * (self.count + 1) + 1e-9)
        return float(self.scores[method][k - 1])

    def check_matches(
        self, weights_fingerprint: str, classes: Sequence[str], templates_sha256: str, source: str = "calibration",
        negatives: Mapping[str, str] | None = None,
    ) -> None:
        """Refuse a calibration made with other weights, classes, templates or negative labels (`negatives`:
        pool -> digest of the pools in use): its p-values would be wrong."""
        hint = "; calibrate again with 'clipn calibrate'"
        if self.weights_fingerprint != weights_fingerprint:
            raise CalibrationError(
                f"{source}: made with other weights (fingerprint {self.weights_fingerprint[:12] or 'none'}, "
                f"loaded weights {weights_fingerprint[:12]}){hint}"
            )
        if list(self.classes) != list(classes):
            raise CalibrationError(f"{source}: made for other classes ({_short(self.classes)}; now {_short(classes)}){hint}")
        if self.templates_sha256 != templates_sha256:
            raise CalibrationError(f"{source}: made with other prompt templates ('{self.templates}'){hint}")
        for pool, digest in (negatives or {}).items():
            if pool in self.negatives and self.negatives[pool] != digest:
                raise CalibrationError(f"{source}: made with other '{pool}' negative labels (another word list){hint} and the same --words")

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "score_direction": "higher = more ID; p_value = (1 + #{calibration scores <= s}) / (n + 1)",
            "count": self.count,
            "alpha": self.alpha,
            "weights_fingerprint": self.weights_fingerprint,
            "classes": list(self.classes),
            "templates": self.templates,
            "templates_sha256": self.templates_sha256,
            "settings": self.settings,
            **({"negatives": dict(self.negatives)} if self.negatives else {}),
            "scores": {m: v.tolist() for m, v in self.scores.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON file atomically (floats round-trip exactly)."""
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write(json_text(self.as_dict()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read and check a calibration file; anything malformed is one CalibrationError."""
        path = Path(path)
        try:
            data = read_json(path, MAX_FILE_BYTES, JSON_LIMITS)
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such calibration file") from None
        except OSError as exc:
            raise CalibrationError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except JSONLimitError as exc:  # refused before parsing: far more than a calibration holds
            raise CalibrationError(f"{path}: not a clipn calibration file (not JSON clipn reads: it {exc})") from None
        except (FileTooLargeError, NotRegularFileError) as exc:
            raise CalibrationError(f"{path}: {exc}") from None
        except ValueError:  # not JSON, or not UTF-8
            raise CalibrationError(f"{path}: not a clipn calibration file (not JSON); make one with 'clipn calibrate'") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{path}: not a clipn calibration file; make one with 'clipn calibrate'")
        if data.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: calibration format version {str(data.get('format_version'))[:20]!r} is not one this clipn-cli reads ({FORMAT_VERSION})")
        unknown = sorted(str(k)[:40] for k in set(data) - KEYS)
        if unknown:  # nothing this version wrote: data nobody checks is not kept
            raise CalibrationError(f"{path}: damaged calibration file (unknown key '{unknown[0]}')")
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], path: Path) -> Calibration:
        def damaged(why: str) -> CalibrationError:
            return CalibrationError(f"{path}: damaged calibration file ({why})")

        scores = data.get("scores")
        if not isinstance(scores, dict) or not scores:
            raise damaged("no scores")
        arrays = {}
        for method, values in scores.items():
            if not (isinstance(values, list) and values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise damaged(f"'{str(method)[:40]}' scores are not a list of numbers")
            try:
                array = np.asarray(values, dtype=np.float64)
            except OverflowError:  # an integer beyond float64
                raise damaged(f"'{str(method)[:40]}' scores hold a number too large for a float") from None
            if not np.isfinite(array).all():
                raise damaged(f"'{str(method)[:40]}' scores contain NaN or Inf")
            arrays[str(method)] = array
        count = data.get("count")
        if len({a.size for a in arrays.values()}) != 1 or isinstance(count, bool) or count != next(iter(arrays.values())).size:
            raise damaged("score counts disagree")
        classes = data.get("classes")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise damaged("classes are not a list of strings")
        text = {k: data.get(k) for k in ("weights_fingerprint", "templates", "templates_sha256")}
        if not all(isinstance(v, str) for v in text.values()):
            raise damaged("weights fingerprint or templates missing")
        alpha = data.get("alpha", DEFAULT_ALPHA)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1):
            raise damaged(f"alpha {str(alpha)[:20]!r}")
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        negatives = data.get("negatives", {})
        if not (isinstance(negatives, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in negatives.items())):
            raise damaged("negatives are not pool names with word-list digests")
        pools = {methods.BY_NAME[m].pool for m in arrays if m in methods.BY_NAME and methods.BY_NAME[m].pool}
        if not pools <= set(negatives):
            raise damaged(f"scores of '{sorted(pools - set(negatives))[0][:40]}' without the digest of its negative labels")
        return cls(arrays, text["weights_fingerprint"], classes, text["templates"], text["templates_sha256"], float(alpha), settings, negatives)


def _short(names: Sequence[str]) -> str:
    shown = ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} classes: {shown}"


@dataclass(frozen=True)
class OperatingPoint:
    """A method's calibrated verdict measured on held-out ID images and on each OOD set."""

    method: str
    alpha: float
    calibration_size: int
    id_test_size: int
    id_flagged: float
    ood_caught: dict[str, float]
    # the sorted calibration scores and which ID images gave them: the report shows per-image verdicts
    calibration_scores: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)
    calibration_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False, compare=False)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """This operating point's verdict for each of `scores`: True = OOD (p-value <= alpha)."""
        return p_values(self.calibration_scores, scores) <= self.alpha

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "alpha": self.alpha, "calibration_images": self.calibration_size,
                "id_test_images": self.id_test_size, "id_flagged": self.id_flagged, "ood_caught": self.ood_caught}


def split_indices(n: int, seed: int = 0, fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n): (calibration indices, test indices)."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(n * fraction)
    return np.sort(order[:k]), np.sort(order[k:])


def operating_points(
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, Mapping[str, np.ndarray]],
    alpha: float,
    seed: int = 0,
    fraction: float = 0.5,
) -> list[OperatingPoint]:
    """Calibrate every method on a seeded random `fraction` of the ID images, test on the rest.

    `id_scores`: method -> ID scores; `ood_scores`: set name -> method -> scores. The same split
    serves every method. Raises CalibrationError when the calibration part is too small for α.
    """
    n = len(next(iter(id_scores.values())))
    calib_idx, test_idx = split_indices(n, seed, fraction)
    check_size(calib_idx.size, alpha, f"--alpha {alpha:g} on a random half of {n} ID images")
    if test_idx.size == 0:
        raise CalibrationError(f"{n} ID images leave none to test the calibration on")
    points = []
    for method, values in id_scores.items():
        values = np.asarray(values, dtype=np.float64)
        calib = np.sort(values[calib_idx])
        flagged = p_values(calib, values[test_idx]) <= alpha
        caught = {name: float(np.mean(p_values(calib, sets[method]) <= alpha)) for name, sets in ood_scores.items()}
        points.append(OperatingPoint(method, alpha, calib_idx.size, test_idx.size, float(flagged.mean()), caught, calib, calib_idx))
    return points


def record_score(record: Mapping[str, Any], method: str) -> float:
    """A detection record's score for `method` (the one place that maps methods to record fields)."""
    return float(record[RECORD_FIELDS[method]])


@dataclass
class CalibratedVerdicts:
    """Calibrated verdicts for detection records: `p_value` per record, OOD when p <= α (or by BH at `fdr`)."""

    calibration: Calibration
    method: str
    alpha: float
    fdr: float | None = None

    def __post_init__(self) -> None:
        if self.method not in RECORD_FIELDS:
            raise CalibrationError(f"--rule {self.method} cannot be calibrated (choose one of {', '.join(RECORD_FIELDS)})")
        self.calibration.p_values(self.method, 0.0)  # refuses a file without this method's scores
        if self.fdr is None:
            check_alpha(self.alpha)
            check_size(self.calibration.count, self.alpha)
        elif not 0 < self.fdr < 1:
            raise CalibrationError(f"--fdr must be between 0 and 1 (exclusive), not {self.fdr}")

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add `p_value` and set the verdict by p <= α (error records pass through)."""
        if "error" in record:
            return record
        p = float(self.calibration.p_values(self.method, record_score(record, self.method)))
        record["rule"] = self.method
        record["p_value"] = p
        record["verdict"] = "OOD" if p <= self.alpha else "ID"
        return record

    def apply_fdr(self, records: Sequence[dict[str, Any]]) -> None:
        """Benjamini–Hochberg over a whole run: `q_value` per record, OOD when q <= `fdr`."""
        scored = [r for r in records if "error" not in r]
        q = benjamini_hochberg([r["p_value"] for r in scored])
        for record, value in zip(scored, q.tolist()):
            record["q_value"] = value
            record["verdict"] = "OOD" if value <= self.fdr else "ID"  # type: ignore[operator]
