"""NegLabel scoring cost against a ViT-B-16 forward on the CPU, and how much the scores move with
the groups' permutation (the CPU generator cannot draw the official CUDA permutation).

    PYTHONPATH=. python benchmarks/neglabel.py [--reps 5] [--json out.json]

1. Speed (A/B alternated in one run, medians, load average reported): per batch of 12 images,
   (A) the ViT-B-16 image tower forward, (B) `scoring.score_heads` with 1,000 ID classes and
   10,000 NegLabel negatives (CLIPN rules, MCM, NegLabel and ATD+NegLabel together), (C) the old
   per-batch normalisation of 50,000-class heads against (D) heads normalised once.
   Target: B ≤ 10% of A.
2. Permutation: scores of the same features under the seed-0 CPU permutation and 5 others, on
   synthetic features (image = ID class head or negative + noise): max |Δscore| and ΔAUROC.
Random weights: speed depends on shapes, not values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import open_clip
import torch

from clipn_cli.scores import metrics, negatives
from clipn_cli.heads.embeddings import ClassEmbeddings
from clipn_cli.scores.negatives import NegativePool
from clipn_cli.scores.scoring import Heads, clipn_logits, score_heads

BATCH, CLASSES, NEGATIVES, DIM = 12, 1000, 10_000, 512


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(reps: int) -> dict:
    torch.manual_seed(0)
    visual = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16")).visual.eval()
    pixels = torch.randn(BATCH, 3, 224, 224)
    heads = ClassEmbeddings([str(i) for i in range(CLASSES)], unit(torch.randn(CLASSES, DIM)), unit(torch.randn(CLASSES, DIM)), "", "", "",
                            {"neglabel": NegativePool("neglabel", [str(i) for i in range(NEGATIVES)], unit(torch.randn(NEGATIVES, DIM)), unit(torch.randn(CLASSES, DIM)))})
    prepared = Heads.prepare(heads)
    features = unit(torch.randn(BATCH, DIM))
    big_yes, big_no = torch.randn(50_000, DIM), torch.randn(50_000, DIM)
    big_unit = Heads(unit(big_yes), unit(big_no), {})
    with torch.inference_mode():
        visual(pixels), score_heads(features, prepared)  # warm-up
        rows = {"forward": [], "neglabel_scoring": [], "renormalise_50k": [], "once_50k": []}
        for _ in range(reps):
            rows["forward"].append(timed(lambda: visual(pixels)))
            rows["neglabel_scoring"].append(timed(lambda: score_heads(features, prepared)))
            rows["renormalise_50k"].append(timed(lambda: clipn_logits(features, big_yes, big_no)))
            rows["once_50k"].append(timed(lambda: clipn_logits(features, big_unit.yes, big_unit.no, heads_normalized=True)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "batch": BATCH, "threads": torch.get_num_threads(), "medians_s": med,
        "neglabel_over_forward": med["neglabel_scoring"] / med["forward"],
        "renormalise_over_once_50k": med["renormalise_50k"] / med["once_50k"],
        "load_average": os.getloadavg(),
    }


def permutation_sensitivity(seeds: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    ids, negs = unit(torch.randn(CLASSES, DIM, generator=g)), unit(torch.randn(NEGATIVES, DIM, generator=g))

    def near(targets: torch.Tensor) -> torch.Tensor:  # cosine ≈ 0.3 to its target, as CLIP images to their class prompt
        picked = targets[torch.randint(0, len(targets), (500,), generator=g)]
        return unit(0.3 * picked + 0.95 * unit(torch.randn(500, DIM, generator=g)))

    id_images, ood_images = near(ids), near(negs)

    def scores(images: torch.Tensor, seed: int) -> torch.Tensor:
        perm = negatives.group_permutation(NEGATIVES, seed=seed)
        return negatives.grouped_id_mass(100.0 * images @ ids.T, 100.0 * images @ negs.T, perm).double()

    base_id, base_ood = scores(id_images, 0), scores(ood_images, 0)
    base_auroc = metrics.ood_metrics(base_id.numpy(), base_ood.numpy())["auroc"]
    changes, aurocs = [], []
    for seed in range(1, seeds + 1):
        s_id, s_ood = scores(id_images, seed), scores(ood_images, seed)
        changes.append(float(torch.cat([(s_id - base_id).abs(), (s_ood - base_ood).abs()]).max()))
        aurocs.append(metrics.ood_metrics(s_id.numpy(), s_ood.numpy())["auroc"] - base_auroc)
    return {
        "negatives": NEGATIVES, "classes": CLASSES, "images": 1000, "other_seeds": seeds,
        "score_range": [float(min(base_id.min(), base_ood.min())), float(max(base_id.max(), base_ood.max()))],
        "max_abs_score_change": max(changes), "max_abs_auroc_change": max(abs(a) for a in aurocs), "auroc": base_auroc,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"speed": speed(args.reps), "permutation": permutation_sensitivity()}
    s, p = result["speed"], result["permutation"]
    print(f"load average {s['load_average'][0]:.2f}; ViT-B-16 forward ×{BATCH}: {s['medians_s']['forward'] * 1000:.0f} ms; "
          f"NegLabel scoring ({CLASSES} classes, {NEGATIVES} negatives): {s['medians_s']['neglabel_scoring'] * 1000:.1f} ms "
          f"= {100 * s['neglabel_over_forward']:.2f}% of the forward (target ≤ 10%)")
    print(f"50,000-class logits: normalising per batch {s['medians_s']['renormalise_50k'] * 1000:.1f} ms, once "
          f"{s['medians_s']['once_50k'] * 1000:.1f} ms ({s['renormalise_over_once_50k']:.1f}×)")
    print(f"permutation: max |Δscore| {p['max_abs_score_change']:.2e} over {p['other_seeds']} other seeds "
          f"(scores {p['score_range'][0]:.3f}..{p['score_range'][1]:.3f}), max |ΔAUROC| {p['max_abs_auroc_change']:.2e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
