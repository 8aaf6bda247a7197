"""`clipn train` under torchrun (gloo, two processes on the CPU): the same model as one process, for any
data set size, and a frozen-feature table encoded once across the processes, not once per process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipn_cli.training import load_base, open_data
from clipn_cli.training.batches import build_feature_table, sample_order
from clipn_cli.training.distributed import World, share
from conftest import GROUPING_COSINE, TINY_CLIP, free_port, run_cli, spawn

GOOD = 13  # odd: not a multiple of the world size, nor of the global batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """13 readable images (9 distinct captions) plus one broken file; a plain tiny CLIP and its config.

    `index.jsonl` lists all 14 (the broken one is dropped from the table: 13 samples);
    `good.jsonl` lists the 13 readable ones (for the streamed path); `edge.jsonl` the broken one and one more.
    """
    root = tmp_path_factory.mktemp("dist")
    rows = []
    for i in range(GOOD):
        img = Image.new("RGB", (40, 32), (i * 19 % 256, i * 53 % 256, i * 97 % 256))
        img.putpixel((i, i), (255, 255, 255))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        (root / f"img{i:02d}.png").write_bytes(buffer.getvalue())
        rows.append({"image": f"img{i:02d}.png", "caption": f"a photo of thing {i % 9}"})
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.insert(5, {"image": "broken.png", "caption": "a photo of nothing"})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    edge = [{"image": "broken.png", "caption": "a thing"}, {"image": "img00.png", "caption": "a thing"}]
    (root / "edge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edge), encoding="utf-8")
    (root / "tiny.json").write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    import open_clip

    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**TINY_CLIP).state_dict(), root / "clip.pt")
    return root


def _launch(args: list[str], world_size: int = 2) -> list[tuple[str, str]]:
    """What torchrun does for one node: WORLD_SIZE processes with RANK/LOCAL_RANK and a rendezvous address."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        env.pop("CLIPN_WEIGHTS", None)
        procs.append(spawn([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * world_size, outputs
    return outputs


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("n", [1, 2, 5, 13, 255, 256])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_world_size_shares_one_global_order(n: int, world_size: int) -> None:
    """Interleaving the processes' streams gives the one-process stream, across epoch ends, and resumes anywhere."""
    take = 3 * n + 37  # several epochs, ending mid-epoch
    per_rank = -(-take // world_size)
    one = list(islice(sample_order(n, 5, 0, 1), per_rank * world_size))
    ranks = [list(islice(sample_order(n, 5, r, world_size), per_rank)) for r in range(world_size)]
    assert [ranks[g % world_size][g // world_size] for g in range(per_rank * world_size)] == one
    epochs = [torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003 + e)).tolist() for e in range(len(one) // n + 1)]
    assert one == [i for perm in epochs for i in perm][: len(one)]  # one process: seeded permutations back to back, as before
    for r in range(world_size):
        assert list(islice(sample_order(n, 5, r, world_size, start=4), 5)) == ranks[r][4:9]


def test_shares_are_contiguous_and_balanced() -> None:
    for n in (0, 1, 2, 7, 13, 1000):
        for size in (1, 2, 3, 5):
            parts = [share(n, World(rank, size)) for rank in range(size)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------- 2 processes = 1 process


@pytest.mark.parametrize("source", ["cached", "streamed"])
def test_two_processes_equal_one_for_an_odd_data_set(dataset: Path, tmp_path: Path, source: str) -> None:
    """13 samples, global batch 6: 5 steps cross two epoch ends in the middle of a batch."""
    index, extra = ("index.jsonl", []) if source == "cached" else ("good.jsonl", ["--no-cache-features"])
    common = ["train", "--base", str(dataset / "clip.pt"), "--config", str(dataset / "tiny.json"), "--data", str(dataset / index),
              "--steps", "5", "--device", "cpu", "--workers", "1", *extra]
    single = run_cli(*common, "--batch-size", "6", "--output", str(tmp_path / "one.safetensors"))
    assert single.returncode == 0, single.stderr
    _launch(["-m", "clipn_cli", *common, "--batch-size", "3", "--output", str(tmp_path / "two.safetensors")])
    a, b = _state(tmp_path / "one.safetensors"), _state(tmp_path / "two.safetensors")
    assert a["prompt_no"].abs().max() > 5e-4  # the runs did move the weights (~lr a step): the comparison means something
    for key in a:  # the frozen tensors stay bit for bit what they were
        if "_no" not in key:
            assert torch.equal(a[key], b[key]), key
    # README (Under torchrun): the trained "no" features agree within 1e-5, not each weight: where a
    # gradient is at float-noise level (the attention key bias: 0 in exact arithmetic), Adam turns
    # that noise into steps of up to ~lr in either run, and the two runs sum in different orders.
    captions = [json.loads(line)["caption"] for line in (dataset / index).read_text(encoding="utf-8").splitlines()]
    assert (_no_features(tmp_path / "two.safetensors", captions) - _no_features(tmp_path / "one.safetensors", captions)).abs().max() < 1e-5


def _no_features(weights: Path, captions: list[str]) -> torch.Tensor:
    """Normalized "no" features of each caption under each prompt and under their mean (what detect uses)."""
    from clipn_cli.training.batches import tokenize
    from clipn_cli.weights.checkpoints import load_model

    model, _ = load_model(weights)
    tokens = tokenize(model, captions)
    with torch.no_grad():
        return torch.stack([model.encode_text_no(tokens, normalize=True, prompt_index=torch.full((len(tokens),), k))
                            for k in range(model.num_prompts + 1)])


# ---------------------------------------------------------------- the frozen-feature table, sharded

WORKER = textwrap.dedent("""
    import sys
    import torch
    from clipn_cli.training import load_base, open_data
    from clipn_cli.training import distributed
    from clipn_cli.training.batches import build_feature_table

    root, out, indexes = sys.argv[1], sys.argv[2], sys.argv[3:]
    world = distributed.setup("cpu")
    model = load_base(root + "/clip.pt", config=root + "/tiny.json").model.eval()
    counts = {}
    encode_image, encode_text_yes = model.encode_image, model.encode_text_yes
    def count_image(x, **kw):
        counts["image_rows"] += len(x)
        return encode_image(x, **kw)
    def count_text(x, **kw):
        counts["caption_rows"] += len(x)
        return encode_text_yes(x, **kw)
    def progress(n):
        counts["progress"] += n
    model.encode_image, model.encode_text_yes = count_image, count_text
    results = {}
    for index in indexes:
        counts.update(image_rows=0, caption_rows=0, progress=0)
        table = build_feature_table(model, open_data(root + "/" + index), torch.device("cpu"), batch_size=4, workers=1,
                                    progress=progress, world=world)
        results[index] = {"table": {k: getattr(table, k) for k in ("image", "text_yes", "tokens", "caption_ids", "sample_image", "sample_caption")},
                          "skipped": table.skipped, "counts": dict(counts)}
    torch.save(results, f"{out}.{world.rank}")
    distributed.teardown(world)
""")


def test_each_process_encodes_its_share_and_gathers_the_one_process_table(dataset: Path, tmp_path: Path) -> None:
    """index.jsonl: 14 distinct images (one broken), 10 captions. edge.jsonl: [broken, good] images and one
    caption, so rank 0 has no feature row and no caption to contribute and must still take part in the gathers."""
    model = load_base(str(dataset / "clip.pt"), config=str(dataset / "tiny.json")).model.eval()
    reference = {index: build_feature_table(model, open_data(str(dataset / index)), torch.device("cpu"), batch_size=4, workers=1)
                 for index in ("index.jsonl", "edge.jsonl")}
    assert len(reference["index.jsonl"]) == GOOD and len(reference["index.jsonl"].image) == GOOD
    assert len(reference["index.jsonl"].text_yes) == 10
    assert len(reference["index.jsonl"].skipped) == 1 and "broken.png" in reference["index.jsonl"].skipped[0]

    _launch(["-c", WORKER, str(dataset), str(tmp_path / "table"), "index.jsonl", "edge.jsonl"])
    results = [torch.load(tmp_path / f"table.{rank}", weights_only=True) for rank in range(2)]
    counts = {index: {what: [r[index]["counts"][what] for r in results] for what in ("progress", "image_rows", "caption_rows")}
              for index in reference}
    # 14 distinct images in index order, the broken one (6th) in rank 0's 7; 10 distinct captions
    assert counts["index.jsonl"] == {"progress": [7, 7], "image_rows": [6, 7], "caption_rows": [5, 5]}
    assert counts["edge.jsonl"] == {"progress": [1, 1], "image_rows": [0, 1], "caption_rows": [0, 1]}
    for index, table in reference.items():
        for r in results:
            assert r[index]["skipped"] == table.skipped
            for key, value in r[index]["table"].items():
                torch.testing.assert_close(value, getattr(table, key), rtol=0, atol=GROUPING_COSINE, msg=f"{index} {key}")
