"""Does the conformal guarantee hold on real data? The digits demo's held-out images, many splits.

ID = zero..four (182 held-out images), OOD = five..nine (178). Features are computed once
(`clipn_cli.evaluation.evaluate`); then, for each α and each of `--splits` seeded random splits,
every method is calibrated on part of the ID images and measured on the rest plus every OOD image
with `clipn_cli.scores.calibration.operating_points`, the function behind `clipn eval --alpha`.

For continuous scores the expected ID false-alarm rate is exactly floor(α(n+1))/(n+1) <= α
(n = calibration images): the table prints it as "expected". With half of 182 (n = 91), α = 0.01
would need n >= 99, so it is also run with 60% (n = 109) calibrating. Run from the repository root:

    python benchmarks/calibration_digits.py            # ~30 s on 2 CPU cores; writes calibration_digits.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipn_cli.scores.calibration import min_calibration_size, operating_points  # noqa: E402
from clipn_cli.heads.embeddings import embed_classes  # noqa: E402
from clipn_cli.errors import CalibrationError  # noqa: E402
from clipn_cli.evaluation import evaluate  # noqa: E402
from clipn_cli.inputs.sets import collect_sets  # noqa: E402
from clipn_cli.heads.prompts import clipn_templates  # noqa: E402
from clipn_cli.weights.checkpoints import load_model  # noqa: E402

ID_NAMES = ("zero", "one", "two", "three", "four")
OOD_NAMES = ("five", "six", "seven", "eight", "nine")
METHODS = ("atd", "ctw", "energy", "mcm")
RUNS = ((0.01, 0.5), (0.05, 0.5), (0.1, 0.5), (0.01, 0.6))  # (alpha, calibration fraction)


def digits_build():
    spec = importlib.util.spec_from_file_location("digits_build", ROOT / "examples" / "digits" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=1000)
    parser.add_argument("--weights", type=Path, default=ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "calibration_digits.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        digits_build().export_held_out(Path(tmp))
        model, info = load_model(args.weights, device="cpu")
        heads = embed_classes(model, list(ID_NAMES), clipn_templates(), info.fingerprint)
        sets = collect_sets([f"{tmp}/{n}" for n in ID_NAMES], {"digits": [f"{tmp}/{n}" for n in OOD_NAMES]})
        ev = evaluate(model, heads, sets)
    id_scores = {m: ev.sets[0].scores[m] for m in METHODS}
    ood_scores = {"digits": {m: ev.sets[1].scores[m] for m in METHODS}}
    n_id, n_ood = len(ev.sets[0].paths), len(ev.sets[1].paths)
    rows = []
    for alpha, fraction in RUNS:
        n_cal = int(n_id * fraction)
        row = {"alpha": alpha, "calibration_fraction": fraction, "calibration_images": n_cal, "test_id_images": n_id - n_cal,
               "ood_images": n_ood, "splits": args.splits, "needed": min_calibration_size(alpha)}
        try:
            runs = [operating_points(id_scores, ood_scores, alpha, seed=seed, fraction=fraction) for seed in range(args.splits)]
        except CalibrationError as exc:
            row["refused"] = str(exc)
            rows.append(row)
            continue
        row["expected_id_flagged"] = math.floor(alpha * (n_cal + 1) + 1e-9) / (n_cal + 1)
        for i, method in enumerate(METHODS):
            flagged = np.array([r[i].id_flagged for r in runs])
            caught = np.array([r[i].ood_caught["digits"] for r in runs])
            row[method] = {"id_flagged_mean": float(flagged.mean()), "id_flagged_sd": float(flagged.std(ddof=1)),
                           "id_flagged_se": float(flagged.std(ddof=1) / math.sqrt(len(flagged))),
                           "ood_caught_mean": float(caught.mean()), "ood_caught_sd": float(caught.std(ddof=1))}
        rows.append(row)
    args.output.write_text(json.dumps({"id_images": n_id, "ood_images": n_ood, "methods": METHODS, "runs": rows}, indent=2) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    head = "| α | calibration / test ID | expected ID flagged | " + " | ".join(f"{m.upper()} ID flagged · OOD caught" for m in METHODS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METHODS))]
    for r in rows:
        split = f"{r['calibration_images']} / {r['test_id_images']}"
        if "refused" in r:
            lines.append(f"| {r['alpha']:g} | {split} | refused: needs ≥ {r['needed']} calibration images |" + " — |" * len(METHODS))
            continue
        cells = [f"{100 * r[m]['id_flagged_mean']:.2f}% ± {100 * r[m]['id_flagged_se']:.2f} · {100 * r[m]['ood_caught_mean']:.1f}%" for m in METHODS]
        lines.append(f"| {r['alpha']:g} | {split} | {100 * r['expected_id_flagged']:.2f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
