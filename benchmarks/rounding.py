"""Which weights' rounding moves CLIPN's scores? One tensor group at a time, per 16-bit storage dtype.

    python benchmarks/rounding.py                  # tiny official fixture, 12 images, 128 templates (~1 min)
    python benchmarks/rounding.py --model digits   # the trained digits demo model, 20 images, classes 0-4

Each row rounds only that group's tensors as `clipn convert --dtype` would (then back to fp32) and
reports the largest CTW/ATD change against the fp32 model, and how far the L2-normalized image and
class features moved. It explains benchmarks/RESULTS.md's 16-bit rows: if one small group
dominated, keeping it in fp32 would be a cheap fix; it does not, hence `--dtype int16`.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import torch

from bench import CLASSES, DIGIT_CLASSES
from clipn_cli.heads.embeddings import embed_classes
from clipn_cli.weights.fixedpoint import pack, split_scales, unpack
from clipn_cli.inputs.sources import iter_inputs
from clipn_cli.model.encode import encode_images
from clipn_cli.heads.prompts import load_templates
from clipn_cli.scores.scoring import score
from clipn_cli.weights.checkpoints import convert_checkpoint, load_model
from clipn_cli.weights.format import DTYPES

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
LINEAR = r"(in_proj_weight|out_proj\.weight|c_fc\.weight|c_proj\.weight)$"
GROUPS = {
    "everything": r".*",
    "image tower": r"^visual\.",
    "text towers, linear weights": r"^transformer(_no)?\..*" + LINEAR,
    "token + positional embeddings": r"^(token_embedding|positional_embedding)(_no)?\b",
    "text projections + final norms": r"^(text_projection|ln_final)(_no)?\b",
    "prompt_no": r"^prompt_no$",
    "all norms and biases": r"(ln_|\.bias$|_bias$)",
    "all linear weights only": LINEAR,
    "all but linear weights": r"^(?!.*" + LINEAR + ")",
}
MODELS = {"tiny": CLASSES, "digits": DIGIT_CLASSES}  # the class names bench.py scores each model with


def rounded(value: torch.Tensor, dtype: str) -> torch.Tensor:
    """`value` as a file of `dtype` stores it, back in fp32."""
    if dtype == "int16":
        values, scales = split_scales(pack({"t": value}), "t")
        return unpack(values["t"], scales.get("t"))
    return value.to(DTYPES[dtype]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.model == "tiny":
        weights = Path(tempfile.mkdtemp()) / "tiny.safetensors"
        convert_checkpoint(FIXTURES / "clipn-tiny-official.pt", weights, str(FIXTURES / "clipn-tiny-config.json"))
        images = FIXTURES / "images"
    else:
        weights, images = ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors", ROOT / "examples" / "digits" / "images"
    classes = MODELS[args.model]
    model, _ = load_model(weights)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = list(iter_inputs([str(images)]))
    templates = load_templates("clipn")

    def features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.stack([e.feature for e in encode_images(model, inputs) if e.feature is not None])
        heads = embed_classes(model, classes, templates, "")
        return image, heads.text_yes, heads.text_no

    base = features()
    base_scores = score(*base)
    print(f"{args.model}: {len(base[0])} images, {len(classes)} classes, {len(templates.templates)} templates\n")
    print("| rounded | dtype | share of weights | max CTW/ATD Δ | image feature Δ | yes head Δ | no head Δ |")
    print("|---|---|---|---|---|---|---|")
    total = sum(v.numel() for v in reference.values())
    for dtype in ("fp16", "bf16", "int16"):
        for name, pattern in GROUPS.items():
            chosen = {k for k in reference if re.search(pattern, k)}
            model.load_state_dict({k: rounded(v, dtype) if k in chosen else v for k, v in reference.items()})
            moved = features()
            s = score(*moved)
            delta = max(float((s.ctw - base_scores.ctw).abs().max()), float((s.atd - base_scores.atd).abs().max()))
            shifts = [float((a - b).norm(dim=-1).max()) for a, b in zip(moved, base)]
            share = sum(reference[k].numel() for k in chosen) / total
            print(f"| {name} | {dtype} | {share:.1%} | {delta:.1e} | " + " | ".join(f"{x:.1e}" for x in shifts) + " |", flush=True)


if __name__ == "__main__":
    main()
