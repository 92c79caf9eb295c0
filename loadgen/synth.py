"""Synthetic data in LV-Eval's own layout and field names, for tests and offline benchmarks.

Each row hides one fact (the answer) in a long context of filler passages, with confusing near-facts,
so that a model can in principle answer it. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from beluga.loadgen.dataset import LENGTHS, path_for

WORDS_PER_LEVEL = {"16k": 16_000, "32k": 32_000, "64k": 64_000, "128k": 128_000, "256k": 256_000}
DEFAULT_SUBSETS = ("hotpotwikiqa_mixup", "multifieldqa_en_mixup", "factrecall_en")
_NOUNS = ("river", "harbour", "library", "engine", "garden", "council", "bridge", "market", "archive", "tower",
          "valley", "station", "orchard", "museum", "factory", "island", "quarry", "canal", "forest", "mill")
_VERBS = ("restored", "measured", "described", "founded", "mapped", "rebuilt", "studied", "recorded", "visited")
_NAMES = ("Aldra", "Berin", "Castell", "Dunmore", "Elsk", "Farrow", "Gilden", "Hollis", "Ivra", "Jorun")


def _sentence(rng: random.Random) -> str:
    n = rng.choice(_NOUNS)
    return (f"The {n} of {rng.choice(_NAMES)} was {rng.choice(_VERBS)} by the {rng.choice(_NOUNS)} society "
            f"in {rng.randint(1200, 2020)}.")


def make_rows(subset: str, rows: int, length: str, seed: int, words: int | None = None) -> list[dict]:
    rng = random.Random(f"{seed}/{subset}/{length}")
    target = words or WORDS_PER_LEVEL[length]
    out = []
    for _ in range(rows):
        place, name = rng.choice(_NOUNS), rng.choice(_NAMES)
        year = rng.randint(1200, 2020)
        fact = f"The {place} of {name} was founded in {year}."
        confusing = [f"The {place} of {rng.choice(_NAMES)} was founded in {rng.randint(1200, 2020)}." for _ in range(2)]
        passages, count = [], 0
        while count < target:
            p = " ".join(_sentence(rng) for _ in range(8))
            passages.append(p)
            count += len(p.split())
        for extra in [fact, *confusing]:
            passages.insert(rng.randrange(len(passages) + 1), extra)
        context = "\n\n".join(f"Passage {k + 1}:\n{p}" for k, p in enumerate(passages))
        out.append({"input": f"In which year was the {place} of {name} founded?", "context": context,
                    "answers": [str(year)], "length": len(context.split()), "dataset": subset, "language": "en",
                    "answer_keywords": str(year), "confusing_facts": confusing})
    return out


def write(out: str | Path, subsets: list[str] | None = None, rows: int = 8, length: str = "16k", seed: int = 0,
          words: int | None = None) -> list[Path]:
    if length not in LENGTHS:
        raise ValueError(f"length {length!r} is not one of {LENGTHS}")
    written = []
    for subset in subsets or DEFAULT_SUBSETS:
        p = path_for(out, subset, length)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", encoding="utf-8") as f:
            for row in make_rows(subset, rows, length, seed, words):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(p)
    return written
