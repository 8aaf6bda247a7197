"""`clipn train` pieces: data sources, base initialisation, freezing, resume, multi-process gather."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipn_cli.errors import DataError, TrainError
from clipn_cli.training import TrainConfig, load_base, open_data, train
from clipn_cli.training.data import caption_id, expand_braces
from conftest import IMAGES, SQUARE_COLOURS, TINY_CLIP, cli, free_port, spawn, square_png


def _config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"output": out, "steps": 4, "batch_size": 4, "device": "cpu", "workers": 1, **kw})


# ---------------------------------------------------------------- data sources


class _StopAfter4:
    """Training progress hook that interrupts the run at step 4, as Ctrl-C would."""

    def phase(self, name, total): pass
    def advance(self, n): pass
    def step(self, log):
        if log.step == 4:
            raise KeyboardInterrupt

def test_jsonl_index_paths_relative_to_the_index(captioned_squares: Path) -> None:
    data = open_data(str(captioned_squares / "index.jsonl"))
    assert len(data) == 12
    assert data.pairs[0].image == str(captioned_squares / "img00.png") and data.pairs[0].caption == "a red square"


def test_csv_with_header_tsv_without_header(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('filepath,title\nx/1.png,"a cat, sitting"\n/abs/2.png,a dog\n', encoding="utf-8")
    csv_data = open_data(str(tmp_path / "a.csv"))
    assert [(p.image, p.caption) for p in csv_data.pairs] == [(str(tmp_path / "x/1.png"), "a cat, sitting"), ("/abs/2.png", "a dog")]
    (tmp_path / "b.tsv").write_text("1.png\ta cat\n2.png\t \n", encoding="utf-8")
    tsv_data = open_data(str(tmp_path / "b.tsv"))
    assert [p.caption for p in tsv_data.pairs] == ["a cat"]
    assert tsv_data.skipped == [f"{tmp_path / 'b.tsv'}:2: empty caption"]
    (tmp_path / "c.csv").write_text("name,words\n1.png,a cat\n", encoding="utf-8")
    custom = open_data(str(tmp_path / "c.csv"), image_key="name", caption_key="words")
    assert custom.pairs[0].caption == "a cat"


def test_index_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        open_data(str(bad))
    cols = tmp_path / "cols.jsonl"
    cols.write_text('{"picture": "a.png", "caption": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no image column found among picture, caption; name it with --image-key"):
        open_data(str(cols))
    with pytest.raises(DataError, match="no such file or folder"):
        open_data(str(tmp_path / "missing.csv"))


def test_folder_source_pairs_images_with_txt(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(square_png("red", 1))
    (tmp_path / "sub" / "a.txt").write_text("a red square\n", encoding="utf-8")
    (tmp_path / "b.jpg").write_bytes(b"whatever")
    data = open_data(str(tmp_path))
    assert [(Path(p.image).name, p.caption) for p in data.pairs] == [("a.png", "a red square")]
    assert len(data.skipped) == 1 and "b.jpg: no caption file b.txt" in data.skipped[0]


def test_brace_expansion() -> None:
    assert expand_braces("cc-{0008..0011}.tar") == ["cc-0008.tar", "cc-0009.tar", "cc-0010.tar", "cc-0011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _write_shards(folder: Path, count: int = 2, per_shard: int = 6) -> str:
    for s in range(count):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:04d}"
                colour = SQUARE_COLOURS[(s * per_shard + i) % 6]
                members = {f"{key}.jpg" if i % 2 else f"{key}.png": square_png(colour, i), f"{key}.txt": f"a {colour} square".encode(), f"{key}.json": b"{}"}
                if i == per_shard - 1:
                    del members[f"{key}.txt"]  # a sample without caption is skipped
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / ("shard-{000..%03d}.tar" % (count - 1)))


def test_shards_stream_all_pairs_per_epoch_and_split_by_rank(tmp_path: Path) -> None:
    pattern = _write_shards(tmp_path)
    data = open_data(pattern, shuffle_buffer=3)
    assert data.shards == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    stream = data.stream(seed=0)
    first_epoch = [next(stream) for _ in range(10)]
    assert sorted(p.key.rsplit(":", 1)[1] for p in first_epoch) == sorted(f"{s:03d}{i:04d}" for s in range(2) for i in range(5))
    assert all(isinstance(p.image, bytes) and p.caption.startswith("a ") for p in first_epoch)
    again = data.stream(seed=0)
    assert [next(again).key for _ in range(10)] == [p.key for p in first_epoch]
    rank1 = data.stream(seed=0, rank=1, world_size=2)
    assert {next(rank1).key.split(":")[0] for _ in range(5)} == {str(tmp_path / "shard-001.tar")}
    with pytest.raises(DataError, match="2 shard\\(s\\) cannot feed 3 processes"):
        next(data.stream(seed=0, rank=0, world_size=3))
    with pytest.raises(DataError, match="no such shard"):
        open_data(str(tmp_path / "shard-{000..002}.tar"))


def test_caption_ids_equal_for_equal_text() -> None:
    assert caption_id("a cat") == caption_id("a cat") != caption_id("a cat.")
    assert 0 <= caption_id("x") < 2**63


# ---------------------------------------------------------------- base model


def test_plain_clip_base_initialised_as_official(captioned_squares: Path) -> None:
    base = load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json"))
    state = base.model.state_dict()
    for key in [k for k in state if "_no" not in k and k.startswith(("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection"))]:
        part, _, rest = key.partition(".")
        assert torch.equal(state[key], state[f"{part}_no" + (f".{rest}" if rest else "")]), key
    assert state["prompt_no"].shape == (16, 16, 16) and not state["prompt_no"].any()
    trainable = {n for n, p in base.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in base.model.named_parameters() if "_no" in n}
    assert base.description == "clip:clip.pt"
    with pytest.raises(TrainError, match="no bundled open_clip config matches"):
        load_base(str(captioned_squares / "clip.pt"))
    assert load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json"), num_prompts=4).model.prompt_no.shape[0] == 4


def test_open_clip_tag_base_without_network(monkeypatch: pytest.MonkeyPatch, captioned_squares: Path) -> None:
    import open_clip

    calls = []

    def fake_create_model(name: str, pretrained: str, **kw):
        calls.append((name, pretrained))
        torch.manual_seed(1)
        return open_clip.model.CLIP(**TINY_CLIP)

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.setattr("clipn_cli.training.base._reachable", lambda url, timeout=5.0: True)  # no network here: the check passes, the fake loads
    monkeypatch.setattr("clipn_cli.training.base.resolve_config", lambda name: dict(TINY_CLIP))
    base = load_base("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert calls == [("ViT-B-16", "laion2b_s34b_b88k")]
    assert base.description == "open_clip:ViT-B-16:laion2b_s34b_b88k"
    assert torch.equal(base.model.token_embedding_no.weight, base.model.token_embedding.weight)
    with pytest.raises(TrainError, match="needs --pretrained TAG"):
        load_base("ViT-B-16")


def test_continue_from_clipn_safetensors(tiny_weights: Path) -> None:
    from clipn_cli.weights.checkpoints import load_model

    base = load_base(str(tiny_weights))
    reference, _ = load_model(tiny_weights)
    assert torch.equal(base.model.prompt_no, reference.prompt_no)
    with pytest.raises(TrainError, match="has 16 'no' prompts; --num-prompts 4"):
        load_base(str(tiny_weights), num_prompts=4)


# ---------------------------------------------------------------- training


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_frozen_tensors_bit_identical_and_no_tower_trains(captioned_squares: Path, tmp_path: Path) -> None:
    base = load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json"))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    result = train(base, open_data(str(captioned_squares / "index.jsonl")), _config(tmp_path / "out.safetensors"))
    after = _state(tmp_path / "out.safetensors")
    assert after.keys() == before.keys()
    frozen = [k for k in before if "_no" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["prompt_no"], after["prompt_no"])
    assert not torch.equal(before["transformer_no.resblocks.0.attn.in_proj_weight"], after["transformer_no.resblocks.0.attn.in_proj_weight"])
    meta = result.info.metadata
    assert meta["steps"] == "4" and meta["base"] == "clip:clip.pt" and json.loads(meta["losses"]).keys() == {"loss", "yes", "no", "tso"}


def test_first_step_losses_are_the_official_initial_values(captioned_squares: Path, tmp_path: Path) -> None:
    """"No" tower = copy of the yes tower and zero prompts: p = 0.5, so L_yes = L_no = ln 2, L_TSO = 1.99."""
    seen = []

    class Record:
        def phase(self, name, total): pass
        def advance(self, n): pass
        def step(self, log): seen.append(log)

    base = load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json"))
    train(base, open_data(str(captioned_squares / "index.jsonl")), _config(tmp_path / "o.safetensors", steps=2), Record())
    first = seen[0].losses
    assert first["yes"] == pytest.approx(0.693147, abs=1e-5) and first["no"] == pytest.approx(0.693147, abs=1e-5)
    assert first["tso"] == pytest.approx(1.99, abs=1e-5)
    assert [s.lr for s in seen] == [pytest.approx(3e-4), pytest.approx(1.5e-4)]


@pytest.mark.parametrize("cached", [True, False])
def test_resume_ends_with_the_same_weights(captioned_squares: Path, tmp_path: Path, cached: bool) -> None:
    data = open_data(str(captioned_squares / "index.jsonl"))
    full = tmp_path / "full.safetensors"
    train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data, _config(full, steps=6, cache_features=cached))

    cut = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data,
              _config(cut, steps=6, cache_features=cached, checkpoint_every=3), _StopAfter4())
    checkpoint = tmp_path / "cut.safetensors.ckpt"
    assert checkpoint.is_file() and not cut.exists()
    train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data,
          _config(cut, steps=6, cache_features=cached, checkpoint_every=3, resume=checkpoint))
    a, b = _state(full), _state(cut)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_refuses_changed_settings(captioned_squares: Path, tmp_path: Path) -> None:
    data = open_data(str(captioned_squares / "index.jsonl"))
    base = lambda: load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json"))  # noqa: E731
    train(base(), data, _config(tmp_path / "a.safetensors", steps=4, checkpoint_every=2))
    with pytest.raises(TrainError, match=r"cannot resume with changed settings: lr 0\.0003 → 0\.001"):
        train(base(), data, _config(tmp_path / "a.safetensors", steps=4, lr=1e-3, resume=tmp_path / "a.safetensors.ckpt"))


def test_trains_from_shards(captioned_squares: Path, tmp_path: Path) -> None:
    pattern = _write_shards(tmp_path)
    base = load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json"))
    with pytest.raises(TrainError, match="give --steps, or --samples-per-epoch"):
        train(base, open_data(pattern), _config(tmp_path / "s.safetensors", steps=None))
    result = train(base, open_data(pattern), _config(tmp_path / "s.safetensors", steps=None, epochs=1, samples_per_epoch=8))
    assert result.steps == 2 and (tmp_path / "s.safetensors").is_file()


def test_two_processes_train_the_same_model_as_one(captioned_squares: Path, tmp_path: Path) -> None:
    """torchrun-style launch (gloo): gathered features make 2×B on two processes equal 2B on one."""
    common = ["train", "--base", str(captioned_squares / "clip.pt"), "--config", str(captioned_squares / "tiny.json"),
              "--data", str(captioned_squares / "index.jsonl"), "--steps", "3", "--device", "cpu", "--workers", "1"]
    single = cli(*common, "--batch-size", "6", "--output", str(tmp_path / "one.safetensors"))
    assert single.returncode == 0, single.stderr
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(spawn(
            [sys.executable, "-m", "clipn_cli", *common, "--batch-size", "3", "--output", str(tmp_path / "two.safetensors")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    a, b = _state(tmp_path / "one.safetensors"), _state(tmp_path / "two.safetensors")
    # 3 steps move weights by up to ~1e-3; float summation order differs between the runs and
    # Adam magnifies it where the true gradient is ~0 (the key bias), hence atol 2e-5.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    assert json.loads(_meta(tmp_path / "two.safetensors")["train_config"])["world_size"] == 2


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_gather_features_single_process_is_identity() -> None:
    from clipn_cli.training.distributed import World, gather_features

    x = torch.randn(3, 2, requires_grad=True)
    (y,) = gather_features(World(), x)
    assert y is x


# ---------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(captioned_squares: Path, tmp_path: Path) -> None:
    result = cli("train", "--base", str(captioned_squares / "clip.pt"), "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.safetensors"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.jsonl: no such file or folder" in result.stderr
    result = cli("train", "--base", "ViT-B-16", "--data", str(captioned_squares / "index.jsonl"), "--output", str(tmp_path / "o.safetensors"))
    assert result.returncode == 2 and "needs --pretrained TAG" in result.stderr and "Traceback" not in result.stderr
    result = cli("train", "--base", str(captioned_squares / "clip.pt"), "--config", str(captioned_squares / "tiny.json"), "--data", str(captioned_squares / "index.jsonl"), "--output", str(tmp_path / "o.pt"))
    assert result.returncode == 2 and "must be a .safetensors file" in result.stderr
    result = cli("train", "--base", str(captioned_squares / "clip.pt"), "--config", str(captioned_squares / "tiny.json"), "--data", str(captioned_squares / "index.jsonl"),
                 "--output", str(tmp_path / "o.safetensors"), "--resume", str(tmp_path / "none.ckpt"))
    assert result.returncode == 2 and "none.ckpt: no such checkpoint" in result.stderr


# ---------------------------------------------------------------- augmentation


def test_keyed_crop_follows_torchvision_and_depends_only_on_the_key() -> None:
    from torchvision import transforms

    from clipn_cli.training.augment import KeyedTransform, crop_params, sample_generator

    image = Image.new("RGB", (40, 32), "red")
    for seed in range(20):  # the same draws as torchvision's RandomResizedCrop from an equally seeded generator
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3])
        assert crop_params(40, 32, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed)) == expected
    a = [crop_params(40, 32, (0.9, 1.0), (3 / 4, 4 / 3), sample_generator(0, 0, p)) for p in range(30)]
    assert a == [crop_params(40, 32, (0.9, 1.0), (3 / 4, 4 / 3), sample_generator(0, 0, p)) for p in range(30)]
    assert len(set(a)) > 5  # positions get different crops
    assert a != [crop_params(40, 32, (0.9, 1.0), (3 / 4, 4 / 3), sample_generator(1, 0, p)) for p in range(30)]
    import open_clip

    keyed = KeyedTransform(open_clip.image_transform(32, is_train=True), seed=0)
    photo = Image.open(IMAGES / "chelsea.png").convert("RGB").crop((0, 0, 300, 300))  # square: a wide photo always gets the central crop
    torch.manual_seed(0)
    first = keyed(photo, 5)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(first, keyed(photo, 5)) and not torch.equal(first, keyed(photo, 6))


def test_augmented_runs_do_not_depend_on_thread_count(captioned_squares: Path, tmp_path: Path) -> None:
    data = open_data(str(captioned_squares / "index.jsonl"))
    runs = {}
    for name, workers, augment in (("one", 1, True), ("four", 4, True), ("four-again", 4, True), ("plain", 4, False)):
        out = tmp_path / f"{name}.safetensors"
        train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data,
              _config(out, steps=4, augment=augment, cache_features=False, workers=workers))
        runs[name] = _state(out)
    for key in runs["one"]:
        assert torch.equal(runs["one"][key], runs["four"][key]), key
        assert torch.equal(runs["four"][key], runs["four-again"][key]), key
    assert any(not torch.equal(runs["one"][k], runs["plain"][k]) for k in runs["one"])  # the crops do change training


def test_augmented_resume_with_several_workers_is_exact(captioned_squares: Path, tmp_path: Path) -> None:
    data = open_data(str(captioned_squares / "index.jsonl"))
    settings = {"steps": 6, "augment": True, "cache_features": False, "workers": 3}
    full = tmp_path / "full.safetensors"
    train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data, _config(full, **settings))

    cut = tmp_path / "cut.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data,
              _config(cut, checkpoint_every=3, **settings), _StopAfter4())
    train(load_base(str(captioned_squares / "clip.pt"), config=str(captioned_squares / "tiny.json")), data,
          _config(cut, checkpoint_every=3, resume=tmp_path / "cut.safetensors.ckpt", **settings))
    a, b = _state(full), _state(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_summary_repeats_the_last_logged_step(captioned_squares: Path, tmp_path: Path) -> None:
    result = cli("train", "--base", str(captioned_squares / "clip.pt"), "--config", str(captioned_squares / "tiny.json"), "--data", str(captioned_squares / "index.jsonl"),
                 "--steps", "3", "--batch-size", "4", "--device", "cpu", "--workers", "1", "--output", str(tmp_path / "o.safetensors"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    last_step = [line for line in lines if line.startswith("clipn: step ")][-1]
    assert last_step.startswith("clipn: step 3/3 ")
    logged = last_step.removeprefix("clipn: step 3/3 ").split(" lr ")[0]  # "loss a yes b no c tso d"
    summary = lines[-1]
    assert summary.startswith(f"clipn: wrote {tmp_path / 'o.safetensors'}") and summary.endswith(f"losses at step 3: {logged})")
