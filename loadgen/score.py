"""LV-Eval's keyword-gated F1: an answer scores only if it first recalls the answer keywords enough."""

from __future__ import annotations

import re
import string
from collections import Counter

GATE = {"en": 0.2, "zh": 0.4}


def _tokens(text: str, language: str) -> list[str]:
    text = text.lower()
    if language == "zh":
        return [c for c in text if c.strip() and c not in string.punctuation]
    text = "".join(c for c in text if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def f1(pred: str, gold: str, language: str = "en") -> float:
    p, g = _tokens(pred, language), _tokens(gold, language)
    common = sum((Counter(p) & Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score(pred: str, answers: list[str], keywords: str | None, language: str = "en") -> float:
    if keywords:
        kw = max(f1(pred, k.strip(), language) for k in keywords.split(","))
        if kw < GATE.get(language, 0.2):
            return 0.0
    return max((f1(pred, a, language) for a in answers), default=0.0)
