"""Build `wordnet-words.txt.gz`, the candidate words of NegLabel and CSP, from a WordNet 3.0 database.

Not imported at run time: clipn ships the built file. Rebuild it (byte for byte) with

    apt-get install wordnet-base          # Debian/Ubuntu: WordNet 3.0 in /usr/share/wordnet
    python -m clipn_cli.data.build_words /usr/share/wordnet

Each line is `LEXFILE<TAB>word`: per lexicographer file of the 27 NegLabel reads (all noun files but
noun.animal and noun.food, and adj.all, adj.pert, adj.ppl), the first lemma of every synset in
data-file order, lower-cased, '_' as space, adjective markers ('(a)', '(p)', '(ip)') removed, each
word once per file. Measured against the official NegLabel `txtfiles/`: 99.5-100% of each noun
file's words match; adj.all differs more (the official one holds 10,007 words, mostly satellite
synsets, with stray '[' prefixes; this one all 10,994 adjective-cluster synsets).
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

# lexicographer file numbers of WordNet 3.0 (lexnames(5WN))
LEXNAMES = {
    0: "adj.all", 1: "adj.pert", 3: "noun.Tops", 4: "noun.act", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 14: "noun.group",
    15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant",
    21: "noun.possession", 22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time", 44: "adj.ppl",
}
OUTPUT = Path(__file__).with_name("wordnet-words.txt.gz")


def synset_words(data_file: Path) -> dict[str, list[str]]:
    """Lexicographer file → first lemma of each of its synsets, as NegLabel's lists spell them."""
    found: dict[str, dict[str, None]] = {}
    with open(data_file, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" ", 5)
            lexname = LEXNAMES.get(int(fields[1]))
            if lexname is None:
                continue
            word = re.sub(r"\((a|p|ip)\)$", "", fields[4]).replace("_", " ").lower()
            found.setdefault(lexname, {})[word] = None
    return {name: list(words) for name, words in found.items()}


def build(wordnet_dir: Path, output: Path = OUTPUT) -> int:
    words = {**synset_words(wordnet_dir / "data.noun"), **synset_words(wordnet_dir / "data.adj")}
    text = "".join(f"{name}\t{word}\n" for name in sorted(words) for word in words[name])
    with open(output, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fh:
        fh.write(text.encode("utf-8"))
    return text.count("\n")


if __name__ == "__main__":
    count = build(Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet"))
    print(f"wrote {OUTPUT} ({count} words)", file=sys.stderr)
