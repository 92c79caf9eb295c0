"""The compiled block index (cxlpool/table.py) that the server's RPC loop probes."""

import numpy as np

from beluga.cxlpool.server.table import BlockTable


def _key(i: int, tag: bytes = b"blk") -> bytes:
    # Structured keys (same prefix, counter at the end) would all land in one bucket with a weak hash.
    return (tag + b"-" + str(i).encode()).ljust(32, b"\0")


def test_find_insert_remove_with_structured_keys():
    t = BlockTable(5000)
    for s in range(5000):
        t.set_key(s, _key(s))
        t.add(s)
    assert len(t) == 5000
    assert all(t.get(_key(s)) == s for s in range(0, 5000, 7))
    assert t.get(_key(5000)) is None and _key(-1) not in t
    for s in range(0, 5000, 2):
        t.discard(s)
    assert len(t) == 2500
    assert t.get(_key(4)) is None and t.get(_key(5)) == 5
    # A freed slot reused for another key: the old key is gone, the new one found.
    t.set_key(4, _key(9999))
    t.add(4)
    assert t.get(_key(9999)) == 4 and t.get(_key(4)) is None


def test_tombstones_are_cleared_and_lookups_stay_right():
    t = BlockTable(64)
    rng = np.random.default_rng(0)
    live: dict[bytes, int] = {}
    free = list(range(64))
    for _ in range(20000):  # churn far past the table size: rehashes must keep every live key
        if free and (not live or rng.random() < 0.5):
            s = free.pop()
            k = rng.bytes(32)
            t.set_key(s, k)
            t.add(s)
            live[k] = s
        else:
            k = list(live)[int(rng.integers(len(live)))]
            s = live.pop(k)
            t.discard(s)
            free.append(s)
    assert len(t) == len(live)
    assert all(t.get(k) == s for k, s in live.items())
    assert t.gone <= t.tab.size // 4
