"""Writes the toy instruction set shipped in lorax/data/files/instructions_tiny/.

Run: python -m experiments.make_instructions [--out DIR]

Six procedurally generated, checkable instruction kinds (reverse a word, add two numbers,
plural of a regular noun, sort numbers, capitalize words, count the words of an input given
as ``context``), 100 train rows and 16-17 test rows each: 600 in train.jsonl, 100 in
test.jsonl. Test inputs are disjoint from train ones: word tasks draw their words from a
separate part of the word list, number tasks never repeat a train input. The output is a
function of SEED alone (same bytes on every run and machine); tests check this.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

SEED = 20240601
TRAIN_PER_KIND = 100
TEST_ROWS = 100
OUT = pathlib.Path(__file__).resolve().parent.parent / "lorax/data/files/instructions_tiny"

# Regular nouns only, so the plural rule below is always right (no -o, -f, -fe endings).
WORDS = """
apple arm bag ball bank bed bell bench bird boat book bottle box boy brush bus cake
camera candle car card cat chair church city class coat coin cup day desk dish dog door
dress egg eye farm field flag flower fox friend game garden gate girl glass hat hill
horse house island jacket key king lady lake lamp letter lion map market month monkey
mountain nail name nest night ocean orange page paper party pen pencil pig plane planet
plate pocket queen rabbit ring river road rock room rose school sea ship shirt shoe song
star stone story street table teacher tent tiger toy train tree truck valley village
wall watch window wish witch word yard baby berry bus dress fox lunch match beach
bridge cherry penny puppy tax quiz kiss bush peach glove snake cloud
""".split()
WORDS = sorted(set(WORDS))  # a fixed, duplicate-free order before shuffling


def plural(word: str) -> str:
    """The plural of a regular English noun."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + ("zes" if word.endswith("iz") else "es")
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _reverse(word, rng):
    return {"instruction": f"Reverse the letters of the word: {word}", "response": word[::-1]}


def _plural(word, rng):
    return {"instruction": f"Write the plural of: {word}", "response": plural(word)}


def _capitalize(words, rng):
    phrase = " ".join(words)
    return {
        "instruction": f"Capitalize every word: {phrase}",
        "response": " ".join(w.capitalize() for w in words),
    }


def _count_words(words, rng):
    return {
        "instruction": "Count the words in the input.",
        "context": " ".join(words),
        "response": str(len(words)),
    }


def _add(pair, rng):
    a, b = pair
    # An empty context field, as Dolly writes it for rows without one.
    return {"instruction": f"What is {a} plus {b}?", "context": "", "response": str(a + b)}


def _sort(numbers, rng):
    return {
        "instruction": "Sort these numbers from smallest to largest: "
        + ", ".join(map(str, numbers)),
        "response": ", ".join(map(str, sorted(numbers))),
    }


def _unique(draw, n, taken=frozenset()):
    """n distinct inputs from ``draw()``, none of them in ``taken``."""
    seen, out = set(taken), []
    while len(out) < n:
        x = draw()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def make(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Returns (train rows, test rows)."""
    rng = random.Random(seed)
    words = WORDS[:]
    rng.shuffle(words)
    test_words, train_words = words[:25], words[25:]
    assert len(train_words) >= TRAIN_PER_KIND, len(train_words)
    kinds = 6
    test_sizes = [TEST_ROWS // kinds + (k < TEST_ROWS % kinds) for k in range(kinds)]

    def phrases(pool, low, high):
        return lambda: tuple(rng.choice(pool) for _ in range(rng.randint(low, high)))

    pair = lambda: (rng.randint(2, 99), rng.randint(2, 99))
    numbers = lambda: tuple(rng.sample(range(1, 100), rng.randint(3, 5)))
    train, test = [], []
    sources = [
        (_reverse, lambda pool: lambda: rng.choice(pool)),
        (_plural, lambda pool: lambda: rng.choice(pool)),
        (_capitalize, lambda pool: phrases(pool, 2, 4)),
        (_count_words, lambda pool: phrases(pool, 3, 9)),
    ]
    for k, (make_row, source) in enumerate(sources):
        train += [make_row(x, rng) for x in _unique(source(train_words), TRAIN_PER_KIND)]
        test += [make_row(x, rng) for x in _unique(source(test_words), test_sizes[k])]
    for k, (make_row, draw) in enumerate([(_add, pair), (_sort, numbers)], start=len(sources)):
        train_inputs = _unique(draw, TRAIN_PER_KIND)
        train += [make_row(x, rng) for x in train_inputs]
        test += [make_row(x, rng) for x in _unique(draw, test_sizes[k], set(train_inputs))]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write(out: pathlib.Path = OUT, seed: int = SEED) -> None:
    """Writes ``train.jsonl`` and ``test.jsonl`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train.jsonl", "test.jsonl"), make(seed), strict=True):
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
        (out / name).write_bytes(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="output directory")
    args = parser.parse_args()
    write(args.out)
    print(f"wrote {args.out}/train.jsonl and test.jsonl")


if __name__ == "__main__":
    main()
