"""What the image-tower runtimes and lower precisions cost on real data: the digits demo's held-out images.

ID = zero..four (182 held-out images), OOD = five..nine (178), scored with the demo weights by
`clipn_cli.evaluation.evaluate` once per variant. Reported against torch fp32: the largest change of
the CTW and ATD scores, the CTW verdicts (OOD iff CTW < 0.5) that changed, and the AUROC of CTW
and ATD. Run from the repository root (a few minutes on 2 CPU cores; needs the onnx and openvino extras):

    python benchmarks/runtimes_digits.py            # writes benchmarks/runtimes_digits.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibration_digits import ID_NAMES, OOD_NAMES, digits_build  # noqa: E402

from clipn_cli.evaluation import collect_sets, evaluate  # noqa: E402
from clipn_cli.heads.embeddings import embed_classes  # noqa: E402
from clipn_cli.heads.prompts import clipn_templates  # noqa: E402
from clipn_cli.model.encode import quantize_image_tower  # noqa: E402
from clipn_cli.runtimes.towers import attach_runtime  # noqa: E402
from clipn_cli.scores.metrics import auroc  # noqa: E402
from clipn_cli.weights.checkpoints import load_model  # noqa: E402

WEIGHTS = ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors"
VARIANTS = (("torch", "fp32", None), ("onnx", "fp32", None), ("openvino", "fp32", None), ("openvino", "bf16", None),
            ("onnx", "fp32", "int8"), ("torch", "fp32", "int8"))


def scores(folder: Path, home: Path, runtime: str, precision: str, quantize: str | None) -> dict[str, np.ndarray]:
    model, info = load_model(WEIGHTS, device="cpu")
    heads = embed_classes(model, list(ID_NAMES), clipn_templates(), info.fingerprint)
    if quantize and runtime == "torch":
        quantize_image_tower(model)
    attach_runtime(model, runtime, precision, home, info.fingerprint, quantize if runtime != "torch" else None)
    sets = collect_sets([f"{folder}/{n}" for n in ID_NAMES], {"digits": [f"{folder}/{n}" for n in OOD_NAMES]})
    ev = evaluate(model, heads, sets, precision="fp32")
    return {m: np.concatenate([ev.sets[0].scores[m], ev.sets[1].scores[m]]) for m in ("ctw", "atd")} | {"n_id": len(ev.sets[0].paths)}


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        digits_build().export_held_out(Path(tmp) / "images")
        base = None
        for runtime, precision, quantize in VARIANTS:
            name = f"{runtime} {quantize or precision}"
            got = scores(Path(tmp) / "images", Path(tmp) / "runtimes", runtime, precision, quantize)
            base = base or got
            n = base["n_id"]
            rows[name] = {
                "largest_score_change": float(max(np.abs(got[m] - base[m]).max() for m in ("ctw", "atd"))),
                "ctw_verdicts_changed": int(((got["ctw"] < 0.5) != (base["ctw"] < 0.5)).sum()),
                **{f"auroc_{m}": auroc(got[m][:n], got[m][n:]) for m in ("ctw", "atd")},
            }
            print(name, json.dumps(rows[name]), flush=True)
    (ROOT / "benchmarks" / "runtimes_digits.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
