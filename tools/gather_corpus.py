"""Gather the bilingual training corpus from Debian's fortune packages.

Run once by a developer (never at install or run time); the result is committed
under data/corpus/. Needs a Debian-like machine whose apt can reach its mirror:

    python tools/gather_corpus.py --out data/corpus

English: `fortunes-min` and a selection of `fortunes` (BSD licence, see
data/corpus/SOURCES.md). Chinese: `fortunes-zh` (Tang and Song poems and modern
prose; GPL-3.0+). Records are written as in fortune files: text, then a line
holding only `%`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

ENGLISH = {
    "fortunes-min": ["fortunes", "literature", "riddles"],
    "fortunes": ["computers", "education", "food", "goedel", "humorists", "kids", "law", "love",
                 "magic", "medicine", "miscellaneous", "paradoxum", "people", "pets", "platitudes",
                 "science", "songs-poems", "sports", "wisdom", "work"],
}
CHINESE = {"fortunes-zh": ["tang300.u8", "song100.u8", "chinese.u8"]}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def extract(package: str, workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", package], cwd=workdir, check=True, capture_output=True)
    deb = next(workdir.glob(f"{package}_*.deb"))
    root = workdir / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / "usr/share/games/fortunes"


def records(path: Path) -> list[str]:
    text = ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    parts = re.split(r"^%\s*$", text, flags=re.M)
    return [p.strip("\n") for p in parts if p.strip()]


def write(out: Path, chunks: list[str]) -> int:
    out.write_text("".join(c + "\n%\n" for c in chunks), encoding="utf-8")
    return len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/corpus"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, selection in (("en.txt", ENGLISH), ("zh.txt", CHINESE)):
            chunks = []
            for package, files in selection.items():
                folder = extract(package, work)
                for file in files:
                    chunks += records(folder / file)
            print(f"{args.out / name}: {write(args.out / name, chunks)} records")


if __name__ == "__main__":
    main()
