"""Candidate negative labels of NegLabel and CSP: the shipped WordNet words, their prompts, their
embeddings (cached per weights, since they do not depend on the ID classes) and the mining.

NegLabel (`XueJiang16/NegLabel`): every word of the 27 word files once (the first file that lists
it wins: the shipped list is in file-name order), one prompt each: "the nice {}" for nouns, "This is a {} photo" for
adjectives; ID classes as "the nice {}".
CSP (`MengyuanChen21/NeurIPS2024-CSP`): noun.person, noun.quantity, noun.group and adj.pert left
out; nouns and ID classes averaged over 8 templates; each adjective joined to one of 14 superclass
words drawn by Python's `random.choice` after `random.seed(0)` (in candidate order), then averaged
over 4 templates. Prompt features are averaged unnormalised and then normalised, as both codes do.
Mining itself is `negatives.affinity` + `negatives.select_lowest`: a matrix product and a sort.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..scores import negatives
from ..errors import ClipnError, OptionsError
from ..files import UnicodeTextError, decode_utf8, read_bounded

if TYPE_CHECKING:
    from ..model.clipn import CLIPN

WORDS_FILE = "wordnet-words.txt.gz"
NEGLABEL_NOUN = "the nice {}"
NEGLABEL_ADJ = "This is a {} photo"
CSP_NOUN_TEMPLATES = (
    "a close-up photo of the nice {}.", "a photo with the nice {}.", "a good photo with the nice {}.",
    "a photo of the nice {}.", "{}", "the {}", "the good {}", "the nice {}",
)
CSP_SUPERCLASSES = (
    "{} environment", "{} space", "{} object", "{} scene", "{} place", "{} item", "{} area", "{} view",
    "{} thing", "{} pattern", "{} structure", "{} landscape", "{} vista", "{} creature",
)
CSP_ADJ_TEMPLATES = ("{}", "a nice photo of {}", "a good photo of {}", "a close-up photo of {}")
CSP_EXCLUDED = ("noun.person", "noun.quantity", "noun.group", "adj.pert")
CSP_SEED = 0
TEXT_BATCH = 256
MAX_WORDS_BYTES = 64 << 20  # a word list's text (a folder's files together, a gzip file inflated); the shipped one is 1.8 MB
MAX_WORD_CHARS = 256  # the longest WordNet entry is 80; a longer line is not a word
# words in a list (lines, before duplicates are dropped): the shipped list has 80,389. Mining costs time
# and memory in proportion (CSP encodes 8 prompts a word): 200,000 words take minutes on a CPU, not hours
MAX_WORDS = 200_000
MAX_WORDS_ENV = "CLIPN_MAX_WORDS"


@dataclass(frozen=True)
class Candidates:
    """A pool's candidate words, which are adjectives, and each one's prompts (averaged)."""

    pool: str
    words: list[str]
    is_adjective: torch.Tensor  # (M,) bool
    prompts: list[list[str]]

    @property
    def key(self) -> str:
        """Identity of the candidate texts, for the embedding cache."""
        return hashlib.sha256(json.dumps([self.pool, self.prompts]).encode()).hexdigest()


def read_words(path: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """(word file, word) pairs: the shipped WordNet 3.0 list, or `path` in its format.

    `path` holds `FILE<TAB>word` lines (gzip or plain text), FILE naming a word file such as
    `noun.artifact` or `adj.all` (only its part before the dot matters: noun or adj); or `path` is a
    directory of the official repositories' `txtfiles/` layout (`noun.artifact.txt`, `adj.all.txt`,
    ... one word per line), read in `os.listdir` order as the official code reads it, so that on the
    same file system a word listed as both noun and adjective gets the same kind.
    """
    if path is not None and Path(path).is_dir():
        return _read_word_dir(Path(path))
    source = str(path) if path is not None else WORDS_FILE
    try:
        if path is None:
            data = resources.files("clipn_cli.data").joinpath(WORDS_FILE).read_bytes()
        else:
            data = read_bounded(path, MAX_WORDS_BYTES)
        zipped = data[:2] == b"\x1f\x8b"
        text = decode_utf8(_gunzip(data, MAX_WORDS_BYTES) if zipped else data)
    except UnicodeTextError as exc:
        where = " of the inflated text" if zipped else ""
        raise ClipnError(f"{source}: cannot read the word list: not UTF-8 text (byte {exc.offset}{where}, line {exc.line})") from None
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # ValueError: not a regular file, too large
        raise ClipnError(f"{source}: cannot read the word list: {_reason(exc)}") from None
    pairs: list[tuple[str, str]] = []
    limit = max_words()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        _check_count(len(pairs), limit, source)
        name, sep, word = line.partition("\t")
        if not sep or name.split(".")[0] not in ("noun", "adj"):
            raise ClipnError(f"{source}: line {number} is not 'noun.FILE<TAB>word' or 'adj.FILE<TAB>word'")
        pairs.append((name, _checked_word(word, source, number)))
    return pairs


def max_words() -> int:
    """The most words a list may hold: `$CLIPN_MAX_WORDS`, else MAX_WORDS."""
    value = os.environ.get(MAX_WORDS_ENV, "")
    try:
        limit = int(value) if value else MAX_WORDS
    except ValueError:
        raise ClipnError(f"${MAX_WORDS_ENV} must be a whole number of words, not {value[:40]!r}") from None
    if limit < 1:
        raise ClipnError(f"${MAX_WORDS_ENV} must be at least 1, not {limit}")
    return limit


def _check_count(count: int, limit: int, source: str) -> None:
    if count >= limit:
        raise ClipnError(f"{source}: more than {limit:,} words (the limit; mining time grows with the words: "
                         f"raise it with ${MAX_WORDS_ENV})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeTextError):
        return str(exc)
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _gunzip(data: bytes, limit: int) -> bytes:
    """The contents of gzip `data` (every member), refusing more than `limit` bytes: a gzip bomb
    of a few MB would inflate to GBs before `gzip.decompress` returned."""
    out, total = [], 0
    while data:
        inflater = zlib.decompressobj(wbits=31)
        chunk = inflater.decompress(data, limit + 1 - total)
        total += len(chunk)
        if total > limit or inflater.unconsumed_tail:
            raise ValueError(f"inflates to more than {limit >> 20} MiB (the limit for a word list)")
        if not inflater.eof:
            raise EOFError("truncated gzip data")
        out.append(chunk)
        data = inflater.unused_data.lstrip(b"\0")
    return b"".join(out)


def _checked_word(word: str, source: str, number: int) -> str:
    word = word.strip()
    if len(word) > MAX_WORD_CHARS or "\0" in word:
        raise ClipnError(f"{source}: line {number} is not a word ({'a NUL byte' if chr(0) in word else f'over {MAX_WORD_CHARS} characters'})")
    return word


def _read_word_dir(directory: Path) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    total, limit = 0, max_words()
    try:
        entries = os.listdir(directory)
    except OSError as exc:
        raise ClipnError(f"{directory}: cannot list the word folder: {_reason(exc)}") from None
    for entry in entries:
        file = directory / entry
        name = entry[: -len(".txt")]
        if not entry.endswith(".txt") or name.split(".")[0] not in ("noun", "adj"):
            continue
        try:  # a word file that is a FIFO, a device or a folder is named, never skipped or waited on
            data = read_bounded(file, MAX_WORDS_BYTES)
            lines = decode_utf8(data).splitlines()
        except (OSError, ValueError) as exc:
            raise ClipnError(f"{file}: cannot read the word list: {_reason(exc)}") from None
        total += len(data)
        if total > MAX_WORDS_BYTES:
            raise ClipnError(f"{directory}: the word files together are larger than {MAX_WORDS_BYTES >> 20} MiB (the limit for a word list)")
        for number, line in enumerate(lines, 1):
            if line.strip():
                _check_count(len(pairs), limit, str(directory))
                pairs.append((name, _checked_word(line, str(file), number)))
    if not pairs:
        raise ClipnError(f"{directory}: no noun.*.txt or adj.*.txt word files")
    return pairs


def candidates(pool: str, words: list[tuple[str, str]]) -> Candidates:
    """The candidates of `pool` ("neglabel" or "csp") from (file, word) pairs grouped by file, in mining order."""
    if pool not in ("neglabel", "csp"):
        raise OptionsError(f"unknown negative-label pool '{pool}' (expected neglabel or csp)")
    seen: dict[str, bool] = {}
    for name, word in words:  # in the reader's order: the first file that lists a word decides its kind
        if pool == "csp":
            word = word.replace("_", " ")  # CSP's reader does this; NegLabel's does not
        if (pool == "csp" and name in CSP_EXCLUDED) or word in seen:
            continue
        seen[word] = name.startswith("adj")
    nouns = [w for w, adj in seen.items() if not adj]
    adjectives = [w for w, adj in seen.items() if adj]
    if pool == "neglabel":
        prompts = [[NEGLABEL_NOUN.format(w)] for w in nouns] + [[NEGLABEL_ADJ.format(w)] for w in adjectives]
    else:
        draw = random.Random(CSP_SEED)
        phrases = [draw.choice(CSP_SUPERCLASSES).format(w) for w in adjectives]
        prompts = [[t.format(w) for t in CSP_NOUN_TEMPLATES] for w in nouns] + [[t.format(p) for t in CSP_ADJ_TEMPLATES] for p in phrases]
    is_adjective = torch.tensor([False] * len(nouns) + [True] * len(adjectives), dtype=torch.bool)
    return Candidates(pool, nouns + adjectives, is_adjective, prompts)


def id_prompts(pool: str, classes: list[str]) -> list[list[str]]:
    """Each ID class's prompts in `pool`'s own form (its ID heads are not CLIPN's template ensemble)."""
    if pool == "neglabel":
        return [[NEGLABEL_NOUN.format(c)] for c in classes]
    return [[t.format(c) for t in CSP_NOUN_TEMPLATES] for c in classes]


@torch.inference_mode()
def embed_prompts(model: CLIPN, prompts: list[list[str]], progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(len(prompts), D) unit rows: per entry the mean of its prompts' raw yes-tower features, normalised."""
    from .embeddings import tokenizer_for

    model.require_text()
    tokenizer = tokenizer_for(model)
    device = next(model.parameters()).device
    flat = [text for group in prompts for text in group]
    owner = torch.tensor([i for i, group in enumerate(prompts) for _ in group], dtype=torch.long)
    sums = torch.zeros(len(prompts), model.text_projection.shape[1])
    for start in range(0, len(flat), 64 * TEXT_BATCH):  # tokenise in chunks: memory stays flat
        tokens = tokenizer(flat[start : start + 64 * TEXT_BATCH])
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # similar lengths together (exact, see model)
        for at in range(0, len(tokens), TEXT_BATCH):
            idx = order[at : at + TEXT_BATCH]
            features = model.encode_text_yes(tokens[idx].to(device)).float().cpu()
            sums.index_add_(0, owner[start + idx], features)
            if progress:
                progress(len(idx))
    counts = torch.tensor([len(group) for group in prompts], dtype=torch.float32)[:, None]
    return torch.nn.functional.normalize(sums / counts, dim=-1)


def cache_path(weights_fingerprint: str, found: Candidates, root: Path | None = None) -> Path:
    """Where the candidates' embeddings for these weights live: `<home>/negatives/<fp[:16]>/<pool>-<key[:16]>.safetensors`."""
    from ..weights.home import weights_home

    return (root or weights_home() / "negatives") / weights_fingerprint[:16] / f"{found.pool}-{found.key[:16]}.safetensors"


def candidate_embeddings(
    model: CLIPN, found: Candidates, weights_fingerprint: str, cache: bool = True, progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The candidates' unit embeddings, from the cache when these weights made them before."""
    from safetensors.torch import save_file

    from ..files import atomic_path

    path = cache_path(weights_fingerprint, found)
    if cache and _in_cache_folder(path.parent) and not path.is_symlink():  # a link is ignored, and replaced below
        stored = _cached(path, (len(found.words), model.text_projection.shape[1]))
        if stored is not None:
            return stored
    embedded = embed_prompts(model, found.prompts, progress)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not _in_cache_folder(path.parent):
                return embedded
            if path.is_symlink():  # written through, the link would replace the file it points to
                path.unlink()
            with atomic_path(path) as tmp:
                save_file({"candidates": embedded.contiguous()}, str(tmp), metadata={"pool": found.pool, "key": found.key})
        except OSError:
            pass  # a read-only home only costs the re-encoding next time
    return embedded


def _in_cache_folder(folder: Path) -> bool:
    """`folder` lies inside the home's `negatives/` folder once links are followed: a cache folder
    that links out of the home is neither read nor written (the embeddings are encoded afresh)."""
    from ..weights.home import weights_home

    return os.path.realpath(folder).startswith(os.path.realpath(weights_home() / "negatives") + os.sep)


def _cached(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached candidate embeddings at `path` if they are what these candidates need, else None.

    Read through the bounded, one-descriptor reader (a FIFO or device there is not waited on, a
    hostile header is refused); anything damaged, of another shape or not finite is rebuilt, never trusted.
    """
    from ..safetensors_file import SafetensorsError, SafetensorsFile

    try:
        with SafetensorsFile(path) as sf:
            entry = sf.entries.get("candidates")
            if entry is None or entry.shape != shape or not entry.dtype.is_floating_point:
                return None
            stored = sf.tensors(["candidates"])["candidates"].float().clone()
    except (SafetensorsError, OSError, ValueError, RuntimeError):
        return None
    return stored if torch.isfinite(stored).all() else None


def mine(
    model: CLIPN,
    classes: list[str],
    pool: str,
    weights_fingerprint: str,
    words: list[tuple[str, str]] | None = None,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> negatives.NegativePool:
    """The negative labels of `pool` for these ID classes (NegLabel or CSP mining, see `negatives`)."""
    found = candidates(pool, read_words() if words is None else words)
    if not found.words:
        raise ClipnError(f"no candidate words for the '{pool}' negative labels")
    embedded = candidate_embeddings(model, found, weights_fingerprint, cache, progress)
    id_heads = embed_prompts(model, id_prompts(pool, classes))
    score = negatives.affinity(embedded, id_heads, max_cosine=negatives.CSP_MAX_COSINE if pool == "csp" else None)
    kept = negatives.select_lowest(score, found.is_adjective)
    if len(kept) < negatives.GROUPS:
        raise ClipnError(f"only {len(kept)} '{pool}' negative labels were kept: {negatives.GROUPS} groups need at least {negatives.GROUPS} "
                         f"(give a longer word list)")
    return negatives.NegativePool(pool, [found.words[i] for i in kept.tolist()], embedded[kept], id_heads)
