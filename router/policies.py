"""Which worker gets a request. A policy sees workers and the request's routing facts, nothing else: the
default never looks at where KV lives (the pool makes every worker's cache everyone's)."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Protocol

from beluga.router.registry import Worker


@dataclass(frozen=True)
class RequestFacts:
    prefix: str  # the prompt's first characters (prefix-affinity)
    tokens: int  # estimated prompt tokens (least-tokens)


class Policy(Protocol):
    name: str

    def choose(self, workers: list[Worker], facts: RequestFacts) -> Worker: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self):
        self._n = itertools.count()

    def choose(self, workers, facts):
        return workers[next(self._n) % len(workers)]


class LeastLoaded:
    """Fewest in-flight requests (or prompt tokens); ties go round-robin so idle workers alternate."""

    def __init__(self, by: str = "requests"):
        self.by = by
        self.name = "least-loaded" if by == "requests" else "least-tokens"
        self._n = itertools.count()

    def choose(self, workers, facts):
        key = (lambda w: w.in_flight) if self.by == "requests" else (lambda w: w.in_flight_tokens)
        low = min(key(w) for w in workers)
        tied = [w for w in workers if key(w) == low]
        return tied[next(self._n) % len(tied)]


class PowerOfTwo:
    name = "power-of-two"

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def choose(self, workers, facts):
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(workers, 2)
        return a if a.in_flight <= b.in_flight else b


class PrefixAffinity:
    """Consistent hash of the prompt's prefix: the same document goes to the same worker (the cache-aware
    baseline Beluga argues against: it piles popular prefixes onto a few workers)."""

    name = "prefix-affinity"
    VNODES = 64

    def choose(self, workers, facts):
        ring = sorted((_h(f"{w.url}#{i}"), w) for w in workers for i in range(self.VNODES))
        keys = [k for k, _ in ring]
        return ring[bisect.bisect(keys, _h(facts.prefix)) % len(ring)][1]


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def make(name: str) -> Policy:
    factories = {"round-robin": RoundRobin, "least-loaded": LeastLoaded,
                 "least-tokens": lambda: LeastLoaded("tokens"), "power-of-two": PowerOfTwo,
                 "prefix-affinity": PrefixAffinity}
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; use one of {sorted(factories)}")
    return factories[name]()
