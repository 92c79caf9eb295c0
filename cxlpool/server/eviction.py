"""Which committed, unleased slot to give up when the pool runs low.

A policy sees slots, never bytes: `inserted` when a block is committed, `touched` on every hit,
`removed` when a slot leaves the index for another reason, and `victims()` yields candidates in the
order it would evict them (the server skips leased ones). `bench/eviction.py` compares them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator


class LRU:
    name = "lru"

    def __init__(self, capacity: int):
        self.order: OrderedDict[int, None] = OrderedDict()

    def inserted(self, slot: int, key: bytes) -> None:
        self.order[slot] = None

    def touched(self, slot: int) -> None:
        self.order.move_to_end(slot)

    def removed(self, slot: int) -> None:
        self.order.pop(slot, None)

    def victims(self) -> Iterator[int]:
        yield from list(self.order)


class S3FIFO:
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO, and a ghost list of
    keys recently evicted from the small queue. One-hit blocks leave quickly; reused blocks stay."""

    name = "s3fifo"

    def __init__(self, capacity: int, small_fraction: float = 0.1):
        self.small: deque[int] = deque()
        self.main: deque[int] = deque()
        self.ghost: OrderedDict[bytes, None] = OrderedDict()
        self.freq: dict[int, int] = {}
        self.keys: dict[int, bytes] = {}
        self.where: dict[int, str] = {}
        self.capacity = capacity
        self.small_cap = max(1, int(capacity * small_fraction))

    def inserted(self, slot: int, key: bytes) -> None:
        self.freq[slot] = 0
        self.keys[slot] = key
        if key in self.ghost:
            del self.ghost[key]
            self.main.append(slot)
            self.where[slot] = "main"
        else:
            self.small.append(slot)
            self.where[slot] = "small"

    def touched(self, slot: int) -> None:
        if slot in self.freq:
            self.freq[slot] = min(self.freq[slot] + 1, 3)

    def removed(self, slot: int) -> None:
        where = self.where.pop(slot, None)
        if where is not None:
            (self.small if where == "small" else self.main).remove(slot)
            self.freq.pop(slot, None)
            self.keys.pop(slot, None)

    def victims(self) -> Iterator[int]:
        # Bounded passes: every slot can be promoted or aged at most a few times.
        for _ in range(4 * (len(self.small) + len(self.main)) + 1):
            if not self.small and not self.main:
                return
            if self.small and (len(self.small) >= self.small_cap or not self.main):
                slot = self.small.popleft()
                if self.freq[slot] > 0:
                    self.freq[slot] = 0
                    self.main.append(slot)
                    self.where[slot] = "main"
                    continue
                self.small.appendleft(slot)  # the server removes it if it takes it
                self._ghost(self.keys[slot])
                yield slot
            else:
                slot = self.main.popleft()
                if self.freq[slot] > 0:
                    self.freq[slot] -= 1
                    self.main.append(slot)
                    continue
                self.main.appendleft(slot)
                yield slot
            # A yielded slot that the server skipped (leased) goes to the back so we move on.
            if self.where.get(slot) == "small" and self.small and self.small[0] == slot:
                self.small.rotate(-1)
            elif self.where.get(slot) == "main" and self.main and self.main[0] == slot:
                self.main.rotate(-1)

    def _ghost(self, key: bytes) -> None:
        self.ghost[key] = None
        while len(self.ghost) > self.capacity:
            self.ghost.popitem(last=False)


POLICIES = {"lru": LRU, "s3fifo": S3FIFO}


def make(name: str, capacity: int):
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; use one of {sorted(POLICIES)}")
    return POLICIES[name](capacity)
