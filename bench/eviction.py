"""bench/eviction.py: LRU against S3-FIFO on a reuse-heavy trace, through the metadata server's own index.

    python bench/eviction.py [--json]

The trace mixes popular documents (Zipf, reused across requests, as long shared prefixes are) with
one-off documents (a scan of prefixes nobody asks for again). Each request looks up its document's
block chain and stores the blocks it missed, exactly as the connector does. Block hit rate is reported
for each policy at a few pool sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

import numpy as np

from beluga.cxlpool import coherence
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.layout import KVFormat
from beluga.cxlpool.server.index import PoolIndex
from beluga.cxlpool.settings import PoolSettings

FMT = KVFormat("eviction-bench", "float32", 1, 1, 8, 2, "cpu", "bench")


def trace(n_requests: int, n_docs: int, blocks_per_doc: int, one_off: float, seed: int = 0) -> list[list[bytes]]:
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_docs + 1) ** -1.0
    p /= p.sum()
    out = []
    for r in range(n_requests):
        doc = f"once-{r}" if rng.random() < one_off else f"doc-{rng.choice(n_docs, p=p)}"
        out.append([f"{doc}/{b}".encode().ljust(32, b"\0") for b in range(blocks_per_doc)])
    return out


def run(policy: str, slots_wanted: int, reqs: list[list[bytes]]) -> float:
    path = f"/dev/shm/beluga-evict-{uuid.uuid4().hex[:6]}"
    size = 2 * 4096 + 64 * 131200 + slots_wanted * (4096 + 64) + 4096
    s = PoolSettings(path=[path], size=size)
    p = pool_mod.create(s, FMT)
    try:
        ix = PoolIndex(p.mem, p.geo, coherence.make("coherent", p.mem), policy, 0.95, 0.9)
        hits = total = 0
        for chain in reqs:
            slots, _ = ix.lookup("c", chain, lease=False)
            hits += len(slots)
            total += len(chain)
            missing = chain[len(slots):]
            got, gens = ix.alloc("c", missing)
            ix.commit("c", [(sl, g, 0) for sl, g in zip(got, gens, strict=True) if sl >= 0], FMT.block_bytes)
        return hits / total
    finally:
        p.close()
        os.unlink(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    reqs = trace(a.requests, n_docs=1000, blocks_per_doc=8, one_off=0.4)
    rows = []
    for slots in (800, 1600, 3200):
        rows.append({"slots": slots, "lru_hit_rate": run("lru", slots, reqs),
                     "s3fifo_hit_rate": run("s3fifo", slots, reqs)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {"trace": "20k requests, 1,000 Zipf(1.0) documents of 8 blocks, 40 % one-off documents", "rows": rows,
           "s3fifo_better": all(r["s3fifo_hit_rate"] > r["lru_hit_rate"] for r in rows)}
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
