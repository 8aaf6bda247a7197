"""NegLabel and CSP against straightforward reference computations of the official formulas
(XueJiang16/NegLabel, MengyuanChen21/NeurIPS2024-CSP), on fixed features and on the tiny model."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import IMAGES, WORDS, cli

from clipn_cli.scores import negatives
from clipn_cli.heads import wordpool
from clipn_cli.heads.embeddings import ClassEmbeddings, embed_classes
from clipn_cli.errors import ClipnError
from clipn_cli.heads.prompts import load_templates
from clipn_cli.scores import methods as method_table
from clipn_cli.scores.scoring import Heads, score_heads
from clipn_cli.weights.checkpoints import load_model

CLASSES = ["cat", "horse", "rocket", "coffee", "astronaut"]


def unit_rows(generator: torch.Generator, n: int, d: int = 16) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1).float()


def reference_percentile(values: list[float], q: float) -> float:
    """numpy's default ('linear') percentile, written out: position q·(n−1) between sorted values."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reference_mine(candidates: torch.Tensor, ids: torch.Tensor, is_adj: list[bool], csp: bool = False) -> list[int]:
    """The official selection, one candidate at a time: 0.95 percentile, CSP's max-cosine exclusion,
    nouns and adjectives ranked apart ascending, the lowest int(n·0.15) of each kind, nouns first."""
    cos = (candidates.double() @ ids.double().T).tolist()
    affinity = []
    for row in cos:
        value = reference_percentile(row, 0.95)
        if csp and max(row) > 0.95:
            value = 1.0
        affinity.append(value)
    kept = []
    for kind in (False, True):
        members = [i for i, adj in enumerate(is_adj) if adj == kind]
        members.sort(key=lambda i: affinity[i])
        kept += members[: int(len(members) * 0.15)]
    return kept


def reference_score(image: torch.Tensor, ids: torch.Tensor, negs: torch.Tensor, permutation: torch.Tensor) -> list[float]:
    """The official grouping: drop the last M mod 100 negatives, permute, 100 groups, per group the ID
    mass of softmax([100·cos ID, 100·cos group]), mean over groups (float64 loops)."""
    pos = 100.0 * image.double() @ ids.double().T
    neg = 100.0 * image.double() @ negs.double().T
    drop = neg.shape[1] % 100
    if drop:
        neg = neg[:, :-drop]
    neg = neg[:, permutation]
    size = neg.shape[1] // 100
    out = []
    for n in range(len(image)):
        masses = []
        for g in range(100):
            full = torch.cat([pos[n], neg[n, g * size : (g + 1) * size]]).softmax(dim=0)
            masses.append(float(full[: pos.shape[1]].sum()))
        out.append(sum(masses) / 100)
    return out


def test_affinity_and_selection_follow_the_official_procedure() -> None:
    g = torch.Generator().manual_seed(1)
    ids, cands = unit_rows(g, 9), unit_rows(g, 1500)
    is_adj = [i % 5 == 0 for i in range(len(cands))]
    found = negatives.affinity(cands, ids)
    expected = [reference_percentile(row, 0.95) for row in (cands.double() @ ids.double().T).tolist()]
    assert torch.allclose(found.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    kept = negatives.select_lowest(found, torch.tensor(is_adj))
    assert kept.tolist() == reference_mine(cands, ids, is_adj)
    assert len(kept) == int(1200 * 0.15) + int(300 * 0.15)  # 15% of each kind, nouns first
    assert not any(is_adj[i] for i in kept[:180]) and all(is_adj[i] for i in kept[180:])


def test_csp_drops_candidates_too_close_to_an_id_class() -> None:
    g = torch.Generator().manual_seed(2)
    ids, cands = unit_rows(g, 6), unit_rows(g, 700)
    cands[:40] = torch.nn.functional.normalize(ids[torch.arange(40) % 6] + 0.01 * cands[:40], dim=-1)  # cos > 0.95
    is_adj = [i >= 600 for i in range(700)]
    found = negatives.affinity(cands, ids, max_cosine=0.95)
    assert (found[:40] == 1.0).all() and (found[40:] < 1.0).all()
    kept = negatives.select_lowest(found, torch.tensor(is_adj))
    assert kept.tolist() == reference_mine(cands, ids, is_adj, csp=True) and not set(kept.tolist()) & set(range(40))


@pytest.mark.parametrize("count", [1000, 1234, 10499])
def test_permutation_is_torch_randperm_after_seeding_0(count: int) -> None:
    torch.manual_seed(0)
    assert torch.equal(negatives.group_permutation(count), torch.randperm(count - count % 100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the official permutation is drawn on CUDA")
def test_permutation_on_cuda_is_the_official_one() -> None:
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)
    official = torch.randperm(10400, device="cuda").cpu()
    assert torch.equal(negatives.group_permutation(10499, device="cuda"), official)


def test_grouped_id_mass_equals_the_official_grouping() -> None:
    g = torch.Generator().manual_seed(3)
    images, ids, negs = unit_rows(g, 4), unit_rows(g, 7), unit_rows(g, 1234)
    permutation = negatives.group_permutation(len(negs))
    found = negatives.grouped_id_mass(100.0 * images @ ids.T, 100.0 * images @ negs.T, permutation)
    assert found.tolist() == pytest.approx(reference_score(images, ids, negs, permutation), abs=1e-6)
    other = negatives.grouped_id_mass(100.0 * images @ ids.T, 100.0 * images @ negs.T, torch.arange(1200))
    assert not torch.allclose(found, other, atol=1e-7)  # the permutation matters (which 34 negatives are dropped, too)


def test_temperature_is_0_01() -> None:
    g = torch.Generator().manual_seed(4)
    images, ids, negs = unit_rows(g, 2), unit_rows(g, 3), unit_rows(g, 300)
    pool = negatives.NegativePool("neglabel", [str(i) for i in range(300)], negs, ids)
    prepared = Heads.prepare(ClassEmbeddings(["a", "b", "c"], ids, ids, "", "", "", {"neglabel": pool}))
    found = score_heads(images, prepared).extra["neglabel"]
    assert found.tolist() == pytest.approx(reference_score(images, ids, negs, negatives.group_permutation(300)), abs=1e-6)


def test_grouped_atd_reduces_to_atd_when_negatives_are_far() -> None:
    g = torch.Generator().manual_seed(5)
    logits_yes = 100.0 * unit_rows(g, 3) @ unit_rows(g, 5).T
    p_yes = torch.rand(3, 5, generator=g)
    far = torch.full((3, 200), -1e4)
    score, best = negatives.grouped_atd(logits_yes, p_yes, far, torch.arange(200))
    joint = p_yes * logits_yes.softmax(dim=-1)
    assert torch.allclose(score, joint.sum(-1)) and torch.allclose(best, joint.max(-1).values)
    near = torch.full((3, 200), 1e4)  # a negative label takes all the mass: nothing is known
    assert torch.allclose(negatives.grouped_atd(logits_yes, p_yes, near, torch.arange(200))[0], torch.zeros(3))


def test_candidates_prompts_dedup_and_csp_superclasses() -> None:
    words = [("adj.all", "jack"), ("adj.all", "green"), ("adj.pert", "lunar"), ("adj.ppl", "sought"), ("noun.Tops", "anvil"),
             ("noun.artifact", "jack"), ("noun.artifact", "anvil"), ("noun.person", "tailor")]
    neg = wordpool.candidates("neglabel", words)
    # the first file that lists a word wins: 'jack' is adj.all's, 'anvil' noun.Tops'
    assert neg.words == ["anvil", "tailor", "jack", "green", "lunar", "sought"]
    assert neg.is_adjective.tolist() == [False, False, True, True, True, True]
    assert neg.prompts[1] == ["the nice tailor"] and neg.prompts[2] == ["This is a jack photo"]
    csp = wordpool.candidates("csp", words)
    assert csp.words == ["anvil", "jack", "green", "sought"]  # noun.person, noun.quantity, noun.group, adj.pert left out
    draw = random.Random(0)
    phrases = [draw.choice(wordpool.CSP_SUPERCLASSES).format(w) for w in ("jack", "green", "sought")]
    assert csp.prompts[0] == [t.format("anvil") for t in wordpool.CSP_NOUN_TEMPLATES] and len(csp.prompts[0]) == 8
    assert [p[0] for p in csp.prompts[1:]] == phrases and csp.prompts[1][1] == f"a nice photo of {phrases[0]}"
    random.seed(0)  # the official code seeds the global generator: the same draws
    assert [random.choice(wordpool.CSP_SUPERCLASSES).format(w) for w in ("jack", "green", "sought")] == phrases
    with pytest.raises(ValueError, match="unknown negative-label pool"):
        wordpool.candidates("other", words)


def test_official_txtfiles_directory_is_read_in_listdir_order(tmp_path: Path) -> None:
    (tmp_path / "noun.artifact.txt").write_text("anvil\nsteam_iron\n")
    (tmp_path / "adj.all.txt").write_text("green\n\n")
    (tmp_path / "README.txt").write_text("not words\n")
    listed = [name for name in os.listdir(tmp_path) if name != "README.txt"]  # the official reader's order
    expected = {"adj.all.txt": [("adj.all", "green")], "noun.artifact.txt": [("noun.artifact", "anvil"), ("noun.artifact", "steam_iron")]}
    assert wordpool.read_words(tmp_path) == [pair for name in listed for pair in expected[name]]
    assert wordpool.candidates("csp", wordpool.read_words(tmp_path)).words == ["anvil", "steam iron", "green"]  # nouns first
    assert wordpool.candidates("neglabel", wordpool.read_words(tmp_path)).words == ["anvil", "steam_iron", "green"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipnError, match="no noun"):
        wordpool.read_words(tmp_path / "empty")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="needs Debian's wordnet-base")
def test_shipped_word_list_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    from clipn_cli.data import build_words

    out = tmp_path / "words.txt.gz"
    assert build_words.build(Path("/usr/share/wordnet"), out) == 80389
    assert out.read_bytes() == (Path(wordpool.__file__).parents[1] / "data" / wordpool.WORDS_FILE).read_bytes()


def test_shipped_word_list_is_wordnet_3() -> None:
    pairs = wordpool.read_words()
    files = {name for name, _ in pairs}
    assert len(files) == 27 and "noun.animal" not in files and "noun.food" not in files
    assert len(pairs) == 80389 and ("noun.Tops", "entity") in pairs
    for pool, nouns, adjectives, kept in (("neglabel", 56788, 14006, 10618), ("csp", 46446, 11047, 8623)):
        found = wordpool.candidates(pool, pairs)  # official: 10,499 NegLabel and ~8,400 CSP labels for ImageNet-1K
        assert (int((~found.is_adjective).sum()), int(found.is_adjective.sum())) == (nouns, adjectives)
        assert int(nouns * 0.15) + int(adjectives * 0.15) == kept
    assert (Path(wordpool.__file__).parents[1] / "data" / "WORDNET-LICENSE.txt").read_text().count("Princeton University") >= 3


@pytest.fixture(scope="module")
def tiny(tiny_weights: Path):
    model, info = load_model(tiny_weights)
    return model, info


def test_mining_on_the_tiny_model_equals_a_reference(tiny, tmp_path: Path) -> None:
    """Prompts encoded in input order at full context length (no length sorting), averaged and
    normalised, then the reference mining."""
    from clipn_cli.heads.embeddings import tokenizer_for

    model, info = tiny
    tokenizer = tokenizer_for(model)

    def embed(groups: list[list[str]]) -> torch.Tensor:
        flat = [t for group in groups for t in group]
        with torch.inference_mode():
            features = torch.cat([model.encode_text_yes(tokenizer(flat[i : i + 512])) for i in range(0, len(flat), 512)])
        rows, at = [], 0
        for group in groups:
            rows.append(features[at : at + len(group)].mean(0))
            at += len(group)
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    pairs = wordpool.read_words(WORDS)
    for pool in ("neglabel", "csp"):
        found = wordpool.candidates(pool, pairs)
        mined = wordpool.mine(model, CLASSES, pool, info.fingerprint, pairs)
        ids = embed(wordpool.id_prompts(pool, CLASSES))
        cands = embed(found.prompts)
        expected = reference_mine(cands, ids, found.is_adjective.tolist(), csp=pool == "csp")
        assert mined.words == [found.words[i] for i in expected]
        assert torch.allclose(mined.negatives, cands[expected], atol=1e-5) and torch.allclose(mined.id_heads, ids, atol=1e-5)
    cached = list((tmp_path / "clipn-home" / "negatives" / info.fingerprint[:16]).iterdir())
    assert sorted(p.name.split("-")[0] for p in cached) == ["csp", "neglabel"]


def test_too_few_candidates_is_one_clear_error(tiny) -> None:
    model, info = tiny
    with pytest.raises(ClipnError, match="100 groups need at least 100"):
        wordpool.mine(model, CLASSES, "neglabel", info.fingerprint, [("noun.artifact", f"thing {i}") for i in range(50)])


def test_detect_neglabel_and_csp_end_to_end(tiny, tiny_weights: Path, tmp_path: Path) -> None:
    model, info = tiny
    images = [str(IMAGES / name) for name in ("chelsea.png", "rocket.jpg", "coffee.png", "retina.jpg")]
    common = ["detect", "-w", str(tiny_weights), "--classes", ",".join(CLASSES), "--words", str(WORDS), "--format", "jsonl"]
    result = cli(*common, "--rule", "neglabel", "--threshold", "0.5", "--negatives", "csp", *images)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["rule"] for r in records] == ["neglabel"] * 4
    for r in records:
        assert 0 < r["neglabel_score"] < 1 and 0 < r["csp_score"] < 1 and 0 <= r["atd_neg_score"] <= 1
        assert r["verdict"] == ("OOD" if r["neglabel_score"] < 0.5 else "ID")

    heads = embed_classes(model, CLASSES, load_templates("clipn"), info.fingerprint)
    pairs = wordpool.read_words(WORDS)
    heads.negatives = {p: wordpool.mine(model, CLASSES, p, info.fingerprint, pairs) for p in ("neglabel", "csp")}
    from clipn_cli.model.encode import encode_images
    from clipn_cli.inputs.sources import iter_inputs

    features = torch.stack([e.feature for e in encode_images(model, iter_inputs(images), batch_size=4, workers=0)])
    scores = score_heads(features, Heads.prepare(heads))
    assert [r["neglabel_score"] for r in records] == pytest.approx(scores.extra["neglabel"].tolist(), abs=1e-6)
    assert [r["csp_score"] for r in records] == pytest.approx(scores.extra["csp"].tolist(), abs=1e-6)
    assert [r["atd_score"] for r in records] == pytest.approx(scores.atd.tolist(), abs=1e-6)

    csp = cli(*common, "--rule", "csp", "--threshold", "0.9", images[0])
    assert csp.exit_code == 0 and json.loads(csp.stdout)["verdict"] in ("ID", "OOD") and "neglabel_score" not in json.loads(csp.stdout)
    combined = cli(*common, "--rule", "atd_neg", images[0])  # threshold-free
    record = json.loads(combined.stdout)
    assert record["verdict"] == ("OOD" if 1 - record["atd_neg_score"] > scores.extra["atd_neg_best"][0] else "ID")


def test_detect_refuses_a_rule_without_verdict_or_negatives(tiny_weights: Path, tmp_path: Path) -> None:
    image = str(IMAGES / "chelsea.png")
    result = cli("detect", "-w", str(tiny_weights), "--classes", "cat,dog", "--rule", "neglabel", image)
    assert result.exit_code == 2 and "no threshold-free verdict: give --threshold" in result.stderr
    result = cli("detect", "-w", str(tiny_weights), "--classes", "cat,dog", "--negatives", "bogus", image)
    assert result.exit_code == 2 and "--negatives must be neglabel or csp" in result.stderr
    plain = tmp_path / "plain.safetensors"
    assert cli("embed-classes", "-w", str(tiny_weights), "--classes", "cat,dog", "-o", str(plain), "-t", "simple").exit_code == 0
    result = cli("detect", "-w", str(tiny_weights), "-e", str(plain), "--rule", "csp", "--threshold", "0.5", image)
    assert result.exit_code == 2 and "holds no 'csp' negative labels: rebuild it with 'clipn embed-classes --negatives csp'" in result.stderr


def test_embed_classes_stores_negatives_and_old_files_still_load(tiny_weights: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "heads.safetensors"
    result = cli("embed-classes", "-w", str(tiny_weights), "--classes", ",".join(CLASSES), "-o", str(out), "-t", "simple",
                    "--negatives", "neglabel,csp", "--words", str(WORDS))
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata()["format_version"] == "1.1"
    loaded = ClassEmbeddings.load(out)
    assert set(loaded.negatives) == {"neglabel", "csp"} and len(loaded.negatives["neglabel"].words) >= 100
    image = str(IMAGES / "chelsea.png")
    stored = cli("detect", "-w", str(tiny_weights), "-e", str(out), "--rule", "neglabel", "--threshold", "0.5", "--format", "jsonl", image)
    fresh = cli("detect", "-w", str(tiny_weights), "--classes", ",".join(CLASSES), "-t", "simple", "--words", str(WORDS),
                   "--negatives", "neglabel,csp", "--rule", "neglabel", "--threshold", "0.5", "--format", "jsonl", image)
    assert json.loads(stored.stdout) == json.loads(fresh.stdout)
    plain = tmp_path / "plain.safetensors"
    cli("embed-classes", "-w", str(tiny_weights), "--classes", "cat", "-o", str(plain), "-t", "simple")
    with safe_open(str(plain), framework="pt") as fh:
        assert fh.metadata()["format_version"] == "1"  # no negatives: readable by clipn-cli before them
    assert ClassEmbeddings.load(plain).negatives == {}


def test_eval_reports_and_plots_the_new_methods(tiny_weights: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    id_dir, ood_dir = tmp_path / "id", tmp_path / "ood"
    for folder, names in ((id_dir, ("chelsea.png", "coffee.png", "rocket.jpg")), (ood_dir, ("retina.jpg", "brick.png", "hubble_deep_field.jpg"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes((IMAGES / name).read_bytes())
    result = cli("eval", "-w", str(tiny_weights), "--classes", ",".join(CLASSES), "-t", "simple", "--id", str(id_dir),
                    "--ood", f"misc={ood_dir}", "--negatives", "neglabel,csp", "--words", str(WORDS), "--format", "json",
                    "--plots", str(tmp_path / "plots"), "--save-scores", str(tmp_path / "scores.csv"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    methods = [r["method"] for r in report["results"] if r["ood"] == "misc"]
    assert methods == [m.name for m in method_table.TABLE]  # every method, in table order
    atd_neg = next(r for r in report["results"] if r["method"] == "atd_neg")
    assert "id_flagged" in atd_neg and "id_flagged" not in next(r for r in report["results"] if r["method"] == "neglabel")
    header = (tmp_path / "scores.csv").read_text().splitlines()[0].split(",")
    assert header[5:] == [*methods, *(f"{r}_ood" for r in method_table.VERDICT_RULES), "error"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["roc-misc.png", "scores-misc.png"]
    table = cli("eval", "-w", str(tiny_weights), "--classes", ",".join(CLASSES), "-t", "simple", "--id", str(id_dir),
                   "--ood", f"misc={ood_dir}", "--negatives", "neglabel", "--words", str(WORDS), "--format", "table")
    assert "NegLabel" in table.stdout and "ATD+NegLabel" in table.stdout and "CSP" not in table.stdout


def test_calibrated_neglabel_verdicts(tiny_weights: Path, tmp_path: Path) -> None:
    """calibrate --negatives stores NegLabel/CSP scores with their word lists' digests; detect --rule
    neglabel --calibration gives p-values of the stored scores and refuses other negative labels."""
    from clipn_cli.scores.calibration import Calibration, p_values

    images = [str(IMAGES / n) for n in sorted(os.listdir(IMAGES))]
    calib = tmp_path / "calib.json"
    common = ["-w", str(tiny_weights), "--classes", ",".join(CLASSES)]
    made = cli("calibrate", *common, "--negatives", "neglabel,csp", "--words", str(WORDS), "--alpha", "0.2", "-o", str(calib), *images)
    assert made.exit_code == 0, made.output
    stored = Calibration.load(calib)
    assert {"neglabel", "csp", "atd_neg", "atd"} <= set(stored.scores) and set(stored.negatives) == {"neglabel", "csp"}

    result = cli("detect", *common, "--words", str(WORDS), "--rule", "neglabel", "--calibration", str(calib), "--format", "jsonl", *images[:4])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    want = p_values(stored.scores["neglabel"], [r["neglabel_score"] for r in records])
    assert [r["p_value"] for r in records] == pytest.approx(want.tolist(), abs=0) and all(r["rule"] == "neglabel" for r in records)
    assert [r["verdict"] for r in records] == ["OOD" if p <= 0.2 else "ID" for p in want]

    fewer = tmp_path / "fewer.txt"  # another word list: other negatives, other scores
    fewer.write_text("".join(WORDS.read_text().splitlines(keepends=True)[10:]))
    other = cli("detect", *common, "--words", str(fewer), "--rule", "neglabel", "--calibration", str(calib), images[0])
    assert other.exit_code == 2 and "other 'neglabel' negative labels" in other.output
    plain = tmp_path / "plain.json"
    assert cli("calibrate", *common, "--alpha", "0.2", "-o", str(plain), *images).exit_code == 0
    missing = cli("detect", *common, "--words", str(WORDS), "--rule", "neglabel", "--calibration", str(plain), images[0])
    assert missing.exit_code == 2 and "calibrate --negatives neglabel" in missing.output

    data = json.loads(calib.read_text())
    del data["negatives"]
    calib.write_text(json.dumps(data))
    damaged = cli("detect", *common, "--words", str(WORDS), "--rule", "neglabel", "--calibration", str(calib), images[0])
    assert damaged.exit_code == 2 and "without the digest of its negative labels" in damaged.output
