"""Regenerate the demo evaluation tasks (tasks/demo) from the held-out part of data/corpus.

    python tools/make_demo_tasks.py

The embedded model was trained with `--data data/corpus/en.txt --data data/corpus/zh.txt`,
which holds out every 20th record counting across both files (glmc.train.data); the
demo data come only from those held-out records, so they measure what the model
learnt, not what it memorised. Deterministic (seeded).

* fortune-choice (mul): a record without its ending, and four endings to choose
  from: its own and three of other records (English: the last three words;
  Chinese: the last line of a poem, distractors of the same length).
* fortune-fill (gen): a record with one frequent word (English) or character
  (Chinese) replaced by [MASK]; the answer is that word.
* fortune-lm (lm): held-out English records as one text, scored in windows
  (PPL per word, as GLM-130B computes it).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

from glmc.train.data import split_records

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
ITEMS = 40  # per language and task
COMMON = 60  # the most frequent words / characters of the training records may be blanked
ARTICLES = {"a", "an", "the"}  # F1 and EM drop them, so they make no answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "data/corpus")
    parser.add_argument("--out", type=Path, default=REPO / "tasks/demo/data")
    args = parser.parse_args()

    records = split_records([args.corpus / "en.txt", args.corpus / "zh.txt"])
    english = [r for path, r, held in records if held and path.name == "en.txt"]
    chinese = [r for path, r, held in records if held and path.name == "zh.txt" and _poem_lines(r)]
    train_en = [r for path, r, held in records if not held and path.name == "en.txt"]
    train_zh = [r for path, r, held in records if not held and path.name == "zh.txt"]
    rng = random.Random(SEED)

    _write(args.out / "fortune-choice/en/test.jsonl", _english_choices(english, rng))
    _write(args.out / "fortune-choice/zh/test.jsonl", _chinese_choices(chinese, rng))
    common_words = [w for w, _ in Counter(w for r in train_en for w in _words(r)).most_common(COMMON)]
    common_chars = [c for c, _ in Counter(c for r in train_zh for line in _poem_lines(r) or []
                                          for c in line if _is_han(c)).most_common(COMMON)]
    _write(args.out / "fortune-fill/en/test.jsonl", _english_blanks(english, set(common_words), rng))
    _write(args.out / "fortune-fill/zh/test.jsonl", _chinese_blanks(chinese, set(common_chars), rng))
    lm = args.out / "fortune-lm/en/test.txt"
    lm.parent.mkdir(parents=True, exist_ok=True)
    # One record a line, whitespace collapsed, each line ending " \n" as WikiText's do:
    # GLM-130B counts the words for PPL with text.split(" ").
    lm.write_text("".join(" ".join(r.split()) + " \n" for r in english[:150]), encoding="utf-8")
    print(f"wrote {args.out}")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text.lower())


def _is_han(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def _poem_lines(record: str) -> list[str] | None:
    """The verse lines of a Tang/Song poem record (title, author, lines), or None."""
    lines = record.split("\n")
    if len(lines) < 4 or not lines[0].startswith("《") or not lines[1].startswith("作者"):
        return None
    verse = lines[2:]
    return verse if all(line and _is_han(line[0]) for line in verse) else None


def _english_choices(records: list[str], rng: random.Random) -> list[dict]:
    usable = [r for r in records if "\n" not in r.strip() and 8 <= len(r.split()) <= 40]
    items = []
    for record in rng.sample(usable, ITEMS):
        words = record.split()
        others = rng.sample([r for r in usable if r != record], 3)
        choices = [" ".join(words[-3:])] + [" ".join(o.split()[-3:]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"inputs_pretokenized": " ".join(words[:-3]),
                      "choices_pretokenized": [choices[i] for i in order], "label": order.index(0)})
    return items


def _chinese_choices(records: list[str], rng: random.Random) -> list[dict]:
    poems = [(r, _poem_lines(r)) for r in records]
    items = []
    for record, verse in rng.sample(poems, min(ITEMS, len(poems))):
        last = verse[-1]
        pool = [v[-1] for r, v in poems if r != record and len(v[-1]) == len(last) and v[-1] != last]
        if len(pool) < 3:
            continue
        choices = [last] + rng.sample(pool, 3)
        order = list(range(4))
        rng.shuffle(order)
        context = "\n".join(record.split("\n")[:-1])
        items.append({"inputs_pretokenized": context, "choices_pretokenized": [choices[i] for i in order],
                      "label": order.index(0)})
    return items


def _english_blanks(records: list[str], common: set[str], rng: random.Random) -> list[dict]:
    items = []
    for record in rng.sample(records, len(records)):
        words = record.split()
        spots = [i for i, w in enumerate(words)
                 if 0 < i < len(words) - 1 and w.isalpha() and w.lower() in common - ARTICLES]
        if "\n" in record.strip() or not 6 <= len(words) <= 40 or not spots:
            continue
        i = rng.choice(spots)
        items.append({"inputs_pretokenized": " ".join(words[:i] + ["[MASK]"] + words[i + 1:]),
                      "targets_pretokenized": [words[i]]})
        if len(items) == ITEMS:
            break
    return items


def _chinese_blanks(records: list[str], common: set[str], rng: random.Random) -> list[dict]:
    items = []
    for record in rng.sample(records, len(records)):
        lines = record.split("\n")
        last = lines[-1]
        spots = [i for i, c in enumerate(last) if c in common]
        if not spots:
            continue
        i = rng.choice(spots)
        lines[-1] = last[:i] + "[MASK]" + last[i + 1:]
        items.append({"inputs_pretokenized": "\n".join(lines), "targets_pretokenized": [last[i]]})
        if len(items) == ITEMS:
            break
    return items


def _write(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


if __name__ == "__main__":
    main()
