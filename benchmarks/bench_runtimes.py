"""Image-tower runtimes against today's torch fp32, on this machine (issue 23).

    python benchmarks/bench_runtimes.py                        # ViT-B-16-shaped random CLIPN, 2 rounds, 2 batches of 8
    python benchmarks/bench_runtimes.py --rounds 3 --batches 4 --batch-size 12 --out benchmarks/bench_runtimes.json

Each variant runs in a fresh process (so that an environment variable such as MKL's dispatch can
differ), in rounds: torch-fp32, onnx-fp32, openvino-fp32, …, then again, so background load on this
shared machine hits all alike; the load average is recorded before each run. A run builds the same
seeded random ViT-B-16 image tower, warms up on one batch, then times `encode_batch` (detect's image
tower: the bare forward plus normalisation) over `--batches` batches of random pixels; the parent
exports the ONNX file once beforehand. Reported per variant: median img/s and its ratio to torch
fp32, and against torch fp32's features on a fixed batch of 8 with 10 random classes: the largest
change of CTW and ATD and the number of CTW/ATD verdicts changed.

Variants: torch-fp32 (today), torch-fp32-mkl-avx512 (MKL_ENABLE_INSTRUCTIONS=AVX512), torch-bf16
(autocast), onnx-fp32, onnx-int8 (ONNX Runtime's dynamic quantisation of the exported file),
openvino-fp32, openvino-bf16; torch-fp32-onednn (linear layers through torch.utils.mkldnn.to_mkldnn)
on request (`--variants`): on the ViT it fails in torch's dispatcher (see benchmarks/README.md).
torch-fp32-mkl-intel (on request; needs a C compiler) is a diagnosis, not something clipn ships: the
child runs with LD_PRELOAD of a two-line shim whose `mkl_serv_intel_cpu_true` answers 1, so the MKL
inside torch takes the code path it keeps for Intel processors; its speed-up is the part of the torch
fp32 gap that MKL's vendor check explains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("torch-fp32", "onnx-fp32", "openvino-fp32", "torch-fp32-mkl-avx512", "torch-bf16", "onnx-int8", "openvino-bf16")
ENV = {"torch-fp32-mkl-avx512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}}
INTEL_SHIM = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"


def build_intel_shim(folder: Path) -> bool:
    """The LD_PRELOAD library of the torch-fp32-mkl-intel variant (False: no C compiler here)."""
    if shutil.which("cc") is None:
        return False
    source = folder / "intel_shim.c"
    source.write_text(INTEL_SHIM)
    done = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(folder / "intel_shim.so"), str(source)], capture_output=True)
    if done.returncode == 0:
        ENV["torch-fp32-mkl-intel"] = {"LD_PRELOAD": str(folder / "intel_shim.so")}
    return done.returncode == 0
FINGERPRINT = "b" * 64


def build_tower():  # noqa: ANN201 - torch is imported here, in the child
    import open_clip
    import torch

    from clipn_cli.model.clipn import build_model

    torch.manual_seed(0)
    model = build_model(open_clip.get_model_config("ViT-B-16")).eval()
    model.drop_text_towers()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare(folder: Path) -> None:
    """Export the ONNX file once (and its int8 dynamic quantisation) for every child to reuse."""
    from clipn_cli.runtimes.onnx_export import cached_export

    path = cached_export(build_tower(), folder, FINGERPRINT)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(folder / "int8.onnx"), weight_type=QuantType.QInt8)


def encoder(variant: str, model, folder: Path):  # noqa: ANN001, ANN201
    import torch

    from clipn_cli.model.encode import encode_batch
    from clipn_cli.runtimes.towers import ImageRuntime, OnnxTower, OpenVinoTower

    runtime, precision = variant.split("-")[0], variant.split("-")[1]
    cpu = torch.device("cpu")
    if runtime == "onnx":
        path = folder / ("int8.onnx" if precision == "int8" else f"{FINGERPRINT[:16]}.onnx")
        model.image_runtime = ImageRuntime("onnx", precision, OnnxTower(path))
    elif runtime == "openvino":
        model.image_runtime = ImageRuntime("openvino", precision, OpenVinoTower(folder / f"{FINGERPRINT[:16]}.onnx", precision))
    elif variant.endswith("onednn"):
        from torch.utils import mkldnn

        model.visual = mkldnn.to_mkldnn(model.visual)
    return lambda pixels: encode_batch(model, pixels, cpu, "bf16" if precision == "bf16" and runtime == "torch" else "fp32")


def child(variant: str, folder: Path, batches: int, batch_size: int) -> dict:
    import torch

    torch.manual_seed(1)
    fixed = torch.randn(8, 3, 224, 224)
    data = [torch.randn(batch_size, 3, 224, 224) for _ in range(batches)]
    encode = encoder(variant, build_tower(), folder)
    features = encode(fixed)  # warm-up, and the features the scores are compared on
    load = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    for pixels in data:
        encode(pixels)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"img_s": batches * batch_size / wall, "cpu_s_per_img": cpu / (batches * batch_size), "load_avg": load,
            "features": features.tolist()}


def compare(reference: list, features: list) -> dict:
    import torch

    from clipn_cli.scores.scoring import score

    torch.manual_seed(2)
    yes, no = torch.nn.functional.normalize(torch.randn(2, 10, 512), dim=-1)
    want, got = score(torch.tensor(reference), yes, no), score(torch.tensor(features), yes, no)
    return {"max_ctw_change": float((got.ctw - want.ctw).abs().max()), "max_atd_change": float((got.atd - want.atd).abs().max()),
            "ctw_verdicts_changed": int(((got.ctw < 0.5) != (want.ctw < 0.5)).sum()),
            "atd_verdicts_changed": int(((got.p_ood > got.atd_best) != (want.p_ood > want.atd_best)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.batches, args.batch_size)))
        return
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder)
        if "torch-fp32-mkl-intel" in variants and not build_intel_shim(folder):
            print("torch-fp32-mkl-intel skipped: no C compiler (cc)", flush=True)
            variants.remove("torch-fp32-mkl-intel")
        for n in range(args.rounds):
            for variant in variants:
                command = [sys.executable, __file__, "--child", variant, "--folder", str(folder),
                           "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ENV.get(variant, {})})
                if done.returncode != 0:
                    print(f"round {n}: {variant} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {n}: {variant} {runs[variant][-1]['img_s']:.2f} img/s (load {runs[variant][-1]['load_avg'][0]:.1f})", flush=True)
    base = statistics.median(r["img_s"] for r in runs["torch-fp32"])
    reference = runs["torch-fp32"][0]["features"]
    summary = {}
    for variant, got in runs.items():
        if not got:
            continue
        speed = statistics.median(r["img_s"] for r in got)
        summary[variant] = {"img_s": round(speed, 3), "vs_torch_fp32": round(speed / base, 2),
                            "cpu_s_per_img": round(statistics.median(r["cpu_s_per_img"] for r in got), 3),
                            "load_avg_1min": [round(r["load_avg"][0], 1) for r in got], **compare(reference, got[0]["features"])}
        print(variant, json.dumps(summary[variant]), flush=True)
    conditions = {"cpus": os.cpu_count(), "rounds": args.rounds, "batches": args.batches, "batch_size": args.batch_size,
                  "model": "ViT-B-16-shaped CLIPN image tower, random weights, seed 0"}
    if args.out:
        args.out.write_text(json.dumps({"conditions": conditions, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
