"""LV-Eval files: `{subset}/{subset}_{length}.jsonl`, one JSON object a line, read exactly as shipped.

Fields: input, context, answers (list), length, dataset, language, and optional answer_keywords and
confusing_facts. The prompt is built with the benchmark's own template for the subset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

LENGTHS = ("16k", "32k", "64k", "128k", "256k")
REQUIRED = ("input", "context", "answers", "length", "dataset", "language")


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    subset: str
    index: int
    input: str
    context: str
    answers: list[str]
    length: int
    dataset: str
    language: str
    answer_keywords: str | None = None
    confusing_facts: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.subset}/{self.index}"


@cache
def templates() -> dict[str, str]:
    return json.loads((Path(__file__).parent / "templates.json").read_text(encoding="utf-8"))


def template_for(subset: str) -> str:
    t = templates()
    if subset in t:
        return t[subset]
    base = subset.rsplit("_", 1)[0] if subset.endswith(LENGTHS) else subset
    if base in t:
        return t[base]
    # Unknown subset: the English multi-passage template is the closest generic one.
    return t["multifieldqa_en_mixup"]


def build_prompt(row: Row, context: str | None = None) -> str:
    return template_for(row.subset).format(context=row.context if context is None else context, input=row.input)


def path_for(root: str | Path, subset: str, length: str) -> Path:
    return Path(root) / subset / f"{subset}_{length}.jsonl"


def subsets_in(root: str | Path, length: str) -> list[str]:
    found = Path(root).glob(f"*/*_{length}.jsonl")
    return sorted(p.parent.name for p in found if p.stem == f"{p.parent.name}_{length}")


def read_file(path: str | Path, subset: str | None = None) -> list[Row]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    subset = subset or path.parent.name
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            missing = [k for k in REQUIRED if k not in d]
            if missing:
                raise DataError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            answers = d["answers"] if isinstance(d["answers"], list) else [d["answers"]]
            try:
                length = int(d["length"])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{n}: field length must be a number") from None
            rows.append(Row(subset, len(rows), str(d["input"]), str(d["context"]), [str(a) for a in answers], length,
                            str(d["dataset"]), str(d["language"]), d.get("answer_keywords"),
                            d.get("confusing_facts") or []))
    if not rows:
        raise DataError(f"{path}: empty file (no rows)")
    return rows


def read(root: str | Path, subsets: list[str] | None, length: str) -> list[Row]:
    if length not in LENGTHS:
        raise DataError(f"length {length!r} is not one of {LENGTHS}")
    subsets = subsets or subsets_in(root, length)
    if not subsets:
        raise DataError(f"{root}: no LV-Eval files of length {length} ({{subset}}/{{subset}}_{length}.jsonl)")
    return [r for s in subsets for r in read_file(path_for(root, s, length), s)]
