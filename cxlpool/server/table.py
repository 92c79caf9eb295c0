"""The block index (32-byte block key -> slot) as flat arrays, so compiled code can probe it.

A Python dict would do for the server's own bookkeeping, but the hot calls (lookups) are answered by the
compiled RPC loop (`fastpath`), which cannot reach a dict. Open addressing with linear probing over a
power-of-two table at most half full; `tab` holds slot numbers and each slot's key words live in
`keys[slot]`, so the table is 8 bytes a bucket (16 MB for a million blocks).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from beluga.cxlpool.protocol import KEY_BYTES

EMPTY = -1
GONE = -2  # a deleted entry: probing goes on past it


@njit(cache=True, nogil=True, inline="always")
def _hash(k0, k1, k2, k3):
    # Keys are usually sha256 digests, but tests and tools use structured ones: mix all four words.
    h = k0 ^ (k1 * np.uint64(0x9E3779B97F4A7C15)) ^ (k2 * np.uint64(0xC2B2AE3D27D4EB4F)) ^ k3
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h


@njit(cache=True, nogil=True)
def find(tab, keys, k0, k1, k2, k3):
    """Slot holding the key, or -1."""
    mask = tab.size - 1
    b = np.int64(_hash(k0, k1, k2, k3) & np.uint64(mask))
    while True:
        s = tab[b]
        if s == EMPTY:
            return -1
        if s >= 0 and keys[s, 0] == k0 and keys[s, 1] == k1 and keys[s, 2] == k2 and keys[s, 3] == k3:
            return s
        b = (b + 1) & mask


@njit(cache=True, nogil=True)
def insert(tab, keys, s):
    """Index slot s under the key already stored in keys[s] (the caller checked it is absent)."""
    mask = tab.size - 1
    b = np.int64(_hash(keys[s, 0], keys[s, 1], keys[s, 2], keys[s, 3]) & np.uint64(mask))
    while tab[b] >= 0:
        b = (b + 1) & mask
    tab[b] = s


@njit(cache=True, nogil=True)
def remove(tab, keys, s):
    """Take slot s out of the index; True if it was there."""
    mask = tab.size - 1
    b = np.int64(_hash(keys[s, 0], keys[s, 1], keys[s, 2], keys[s, 3]) & np.uint64(mask))
    while tab[b] != EMPTY:
        if tab[b] == s:
            tab[b] = GONE
            return True
        b = (b + 1) & mask
    return False


@njit(cache=True, nogil=True)
def _insert_all(tab, keys, slots):
    for s in slots:
        insert(tab, keys, s)


class BlockTable:
    """key -> slot for committed blocks. Not thread-safe: the server serialises its callers."""

    def __init__(self, n_slots: int):
        cap = 1024
        while cap < 2 * n_slots:
            cap *= 2
        self.tab = np.full(cap, EMPTY, np.int64)
        self.keys = np.zeros((max(n_slots, 1), KEY_BYTES // 8), np.uint64)
        self.count = 0
        self.gone = 0

    def set_key(self, slot: int, key: bytes) -> None:
        """Remember the key a slot is being written for (indexed later, by `add`)."""
        self.keys[slot] = np.frombuffer(key, np.uint64)

    def key_of(self, slot: int) -> bytes:
        return self.keys[slot].tobytes()

    def get(self, key: bytes) -> int | None:
        k = np.frombuffer(key, np.uint64)
        s = find(self.tab, self.keys, k[0], k[1], k[2], k[3])
        return None if s < 0 else int(s)

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self.count

    def add(self, slot: int) -> None:
        """Index a slot under the key set for it."""
        insert(self.tab, self.keys, slot)
        self.count += 1

    def discard(self, slot: int) -> None:
        if remove(self.tab, self.keys, slot):
            self.count -= 1
            self.gone += 1
            if self.gone > self.tab.size // 4:  # too many tombstones make misses probe long runs
                self._rehash()

    def _rehash(self) -> None:
        live = self.tab[self.tab >= 0]
        self.tab[:] = EMPTY
        _insert_all(self.tab, self.keys, live)
        self.gone = 0
