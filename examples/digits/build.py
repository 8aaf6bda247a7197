"""Build the demo CLIPN `clipn_cli/data/clipn-digits.safetensors` (shipped in the package as `--weights digits`) from scikit-learn's handwritten digits.

1. A tiny CLIP is trained from scratch on the 8×8 digits (upscaled to 32×32), captioned with
   the official 128 CLIPN templates × the digit's English name ("'a photo of a three.'").
2. Its "no" tower is trained with `clipn train`'s library code (same data reader, frozen-feature
   cache, losses and optimiser) on a JSONL index of the same images and captions.

Only samples with index i % 5 != 0 are trained on; i % 5 == 0 are held out. For the README
quickstart, the first two held-out images of each digit that the model judges right (ID = zero to
four) are written to `examples/digits/images/`; the ones passed over are listed in the report.
Deterministic: fixed seeds, one thread. Run from the repository root:

    python examples/digits/build.py            # about 3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
CAPTIONS_PER_IMAGE = 16  # rows per training image in the CLIPN index, each a random template
SPLITS = {"0-4 vs 5-9": (0, 1, 2, 3, 4), "even vs odd": (0, 2, 4, 6, 8)}


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8×8 digit (values 0..16) as a 32×32 RGB picture: dark ink on white, bicubic upscale."""
    ink = (255 - pixels.astype(np.float64) * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(ink, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB")


def load_split() -> tuple[list[Image.Image], np.ndarray, list[Image.Image], np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels, held-out original indices)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("build.py: the digits come from scikit-learn, which is not installed: pip install scikit-learn") from None

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, held = index % 5 != 0, index % 5 == 0
    images = [digit_image(p) for p in digits.images]
    pick = lambda mask: [images[i] for i in index[mask]]  # noqa: E731
    return pick(train), digits.target[train], pick(held), digits.target[held], index[held]


def templates() -> list[str]:
    from clipn_cli.heads.prompts import clipn_templates

    return list(clipn_templates().templates)


def train_base_clip(images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, seed: int) -> torch.nn.Module:
    """Contrastive CLIP training from scratch; a random template per sample and step.

    Several samples of a batch share a digit, so a text is a positive for every image of its
    digit (soft targets) instead of the one image it was drawn for. The temperature is learned
    (it ends near 14); the returned model's logit scale is then set to 100, the value LAION's
    CLIPs (CLIPN's official bases) sit at and the scale CLIPN's inference uses. CLIPN's losses
    use the base's scale: with 14 the "no" head flagged only 75-80% of held-out OOD digits.
    """
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**MODEL_CONFIG)
    tokenizer = SimpleTokenizer(context_length=MODEL_CONFIG["text_cfg"]["context_length"])
    texts = templates()
    tokens = tokenizer([t.format(name) for name in NAMES for t in texts]).view(len(NAMES), len(texts), -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(0, len(images), (batch_size,), generator=gen)
        batch = _augment(images[rows], gen)
        y = labels[rows]
        text = tokens[y, torch.randint(0, len(texts), (batch_size,), generator=gen)]
        f = model.encode_image(batch, normalize=True)
        g = model.encode_text(text, normalize=True)
        logits = model.logit_scale.exp() * f @ g.T
        target = (y[:, None] == y[None, :]).float()
        target = target / target.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 100 == 0:
            print(f"base CLIP step {step + 1}/{steps} loss {loss.item():.4f}", file=sys.stderr)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    return model.eval()


def _augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 pixels (of 32), filled with the background colour."""
    pad = 3
    background = batch[:, :, :1, :1].expand(-1, -1, IMAGE_SIZE + 2 * pad, IMAGE_SIZE + 2 * pad).clone()
    background[:, :, pad:-pad, pad:-pad] = batch
    dx, dy = torch.randint(0, 2 * pad + 1, (2, len(batch)), generator=gen).tolist()
    return torch.stack([background[i, :, y : y + IMAGE_SIZE, x : x + IMAGE_SIZE] for i, (x, y) in enumerate(zip(dx, dy))])


def write_clipn_data(folder: Path, images: list[Image.Image], labels: np.ndarray, seed: int, texts: list[str] | None = None) -> Path:
    """PNG files plus a JSONL index with up to CAPTIONS_PER_IMAGE random-template captions per image."""
    rng = np.random.default_rng(seed)
    texts = texts or templates()
    index = folder / "train.jsonl"
    with open(index, "w", encoding="utf-8") as fh:
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{i:04d}.png"
            image.save(folder / name)
            for t in rng.choice(len(texts), min(CAPTIONS_PER_IMAGE, len(texts)), replace=False):
                fh.write(json.dumps({"image": name, "caption": texts[t].format(NAMES[label])}) + "\n")
    return index


def evaluate(weights: Path, images: list[Image.Image], labels: np.ndarray) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Held-out zero-shot metrics for each split (AUROC of CTW, ATD, MSP; ATD verdict rates) and
    each image's ATD verdict (True = OOD) per split."""
    from sklearn.metrics import roc_auc_score

    from clipn_cli.heads.embeddings import embed_classes
    from clipn_cli.inputs.decode import make_transform
    from clipn_cli.model.encode import encode_batch
    from clipn_cli.heads.prompts import clipn_templates
    from clipn_cli.scores.scoring import score
    from clipn_cli.weights.checkpoints import load_model

    model, info = load_model(weights)
    transform = make_transform(IMAGE_SIZE)
    features = encode_batch(model, torch.stack([transform(im) for im in images]), torch.device("cpu"))
    out, verdicts = {}, {}
    for split, id_digits in SPLITS.items():
        heads = embed_classes(model, [NAMES[d] for d in id_digits], clipn_templates(), info.fingerprint)
        s = score(features, heads.text_yes, heads.text_no)
        is_id = np.isin(labels, id_digits)
        ood = s.is_ood("atd").numpy()
        out[split] = {
            "auroc_ctw": roc_auc_score(is_id, s.ctw.numpy()),
            "auroc_atd": roc_auc_score(is_id, s.atd.numpy()),
            "auroc_msp": roc_auc_score(is_id, s.msp.numpy()),
            "atd_flags_ood": float(ood[~is_id].mean()),
            "atd_flags_id": float(ood[is_id].mean()),
            "id_accuracy": float((np.array(id_digits)[s.pred.numpy()] == labels)[is_id].mean()),
        }
        verdicts[split] = ood
    return out, verdicts


def write_quickstart_images(folder: Path, images: list[Image.Image], labels: np.ndarray, index: np.ndarray, ood: np.ndarray) -> list[str]:
    """The first two held-out images of each digit that the model judges right with ID = zero..four.

    Chosen for a demo that works, so they say nothing about accuracy (the model card does); the
    held-out images passed over are returned, to be reported.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    skipped = []
    for digit in range(10):
        chosen = 0
        for k in np.flatnonzero(labels == digit):
            name = f"{NAMES[digit]}-{index[k]:04d}.png"
            if bool(ood[k]) != (digit >= 5):
                skipped.append(name)
                continue
            images[k].save(folder / name)
            chosen += 1
            if chosen == 2:
                break
    return skipped


def export_held_out(folder: Path) -> None:
    _, _, images, labels, index = load_split()
    for image, label, i in zip(images, labels, index):
        (folder / NAMES[label]).mkdir(parents=True, exist_ok=True)
        image.save(folder / NAMES[label] / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "clipn_cli" / "data" / "clipn-digits.safetensors")
    parser.add_argument("--images", type=Path, default=ROOT / "examples" / "digits" / "images")
    parser.add_argument("--base-steps", type=int, default=900)
    parser.add_argument("--clipn-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--include-same-caption", action="store_true", help="the official L_no (same-caption pairs count as negatives)")
    parser.add_argument("--captions", choices=("clipn", "simple"), default="clipn", help="CLIPN captions: 16 of the 128 templates per image, or only 'a photo of a {}.'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-held-out", type=Path, metavar="DIR", help="only write the 360 held-out digits as DIR/<name>/<index>.png (for 'clipn eval') and exit")
    args = parser.parse_args()
    if args.export_held_out:
        export_held_out(args.export_held_out)
        return

    from clipn_cli.inputs.decode import make_transform
    from clipn_cli.training import TrainConfig, load_base, open_data, train

    torch.set_num_threads(1)
    began = time.perf_counter()
    train_images, train_labels, held_images, held_labels, held_index = load_split()
    transform = make_transform(IMAGE_SIZE)
    pixels = torch.stack([transform(im) for im in train_images])
    clip = train_base_clip(pixels, torch.as_tensor(train_labels), args.base_steps, args.batch_size, args.seed)
    base_seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(clip.state_dict(), work / "digits-clip.pt")
        (work / "digits-clip.json").write_text(json.dumps(MODEL_CONFIG), encoding="utf-8")
        index = write_clipn_data(work, train_images, train_labels, args.seed, ["a photo of a {}."] if args.captions == "simple" else None)
        base = load_base(str(work / "digits-clip.pt"), config=str(work / "digits-clip.json"))
        config = TrainConfig(
            output=args.output, steps=args.clipn_steps, batch_size=args.batch_size, seed=args.seed,
            exclude_same_caption=not args.include_same_caption, device="cpu", workers=2, vocabulary=NAMES,
        )
        result = train(base, open_data(str(index)), config)
    total_seconds = time.perf_counter() - began
    metrics, verdicts = evaluate(args.output, held_images, held_labels)
    skipped = write_quickstart_images(args.images, held_images, held_labels, held_index, verdicts["0-4 vs 5-9"])
    report = {
        "seconds": {"base_clip": round(base_seconds, 1), "total": round(total_seconds, 1)},
        "clipn_losses": result.losses,
        "size_mb": round(args.output.stat().st_size / 1e6, 2),
        "held_out": metrics,
        "quickstart_skipped": skipped,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
