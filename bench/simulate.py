"""bench/simulate.py: a discrete-event model of a serving cluster (16 to 1,024 instances) under skewed load.

    python bench/simulate.py [--costs bench/results/e2e-DATE/results.json] [--json]

Compares cache-oblivious routing over a shared pool (least-loaded; a prefix is a hit if any instance
computed it and the pool still holds it) with cache-aware routing over private caches (consistent hash
of the document, a hit only on the instance that computed it). Documents are drawn from a Zipf
distribution, so under affinity the instances owning popular documents queue up while others idle. The
per-token prefill and load costs are the ones measured by bench/e2e.py (TTFT of a miss and of a pool hit
against context length) when a results file is given, else the defaults below (measured the same way on
the 2-core CPU machine). For each cluster size the arrival rate is raised until the cluster saturates
(queueing delay growing through the run, or over 5x the mean service time), to within 1 %.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import json
import sys
from collections import OrderedDict

import numpy as np

DEFAULT_PREFILL_S_PER_TOKEN = 2.9e-3  # 4,096 tokens miss: ~12 s on one core of the CPU machine
DEFAULT_LOAD_S_PER_TOKEN = 1.4e-4  # 4,096 tokens from the pool: ~0.6 s
DECODE_S = 0.05


class LRU:
    def __init__(self, cap: int):
        self.cap, self.d = cap, OrderedDict()

    def hit(self, k) -> bool:
        if k in self.d:
            self.d.move_to_end(k)
            return True
        return False

    def add(self, k) -> None:
        self.d[k] = None
        self.d.move_to_end(k)
        while len(self.d) > self.cap:
            self.d.popitem(last=False)


def _ring(n: int):
    pts = sorted((int(hashlib.blake2b(f"{i}#{v}".encode(), digest_size=8).hexdigest(), 16), i)
                 for i in range(n) for v in range(32))
    return [p for p, _ in pts], [i for _, i in pts]


def simulate(n: int, rate: float, policy: str, docs, tokens: int, prefill: float, load: float, pool_docs: int,
             local_docs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, len(docs)))
    free = [(0.0, i) for i in range(n)]  # least-loaded: earliest-free instance
    heapq.heapify(free)
    busy_until = np.zeros(n)
    shared = LRU(pool_docs)
    local = [LRU(local_docs) for _ in range(n)]
    keys, owners = _ring(n) if policy == "affinity" else (None, None)
    waits, services, hits = [], [], 0
    for t, d in zip(arrivals, docs, strict=True):
        if policy == "shared":
            _, i = heapq.heappop(free)
            hit = shared.hit(d)
        else:
            h = int(hashlib.blake2b(str(d).encode(), digest_size=8).hexdigest(), 16)
            i = owners[bisect.bisect(keys, h) % len(keys)]
            hit = local[i].hit(d)
        service = (load if hit else prefill) * tokens + DECODE_S
        start = max(t, busy_until[i])
        busy_until[i] = start + service
        if policy == "shared":
            shared.add(d)
            heapq.heappush(free, (busy_until[i], i))
        else:
            local[i].add(d)
        waits.append(start - t)
        services.append(service)
        hits += hit
    span = busy_until.max() - arrivals[0]
    quarters = np.array_split(np.asarray(waits), 4)
    return {"mean_wait_s": float(np.mean(waits)), "mean_service_s": float(np.mean(services)),
            "mean_ttft_s": float(np.mean(waits) + np.mean(services) - DECODE_S), "hit_rate": hits / len(docs),
            "throughput": len(docs) / span, "offered": rate,
            "wait_q2_s": float(quarters[1].mean()), "wait_q4_s": float(quarters[3].mean())}


def saturated(r: dict) -> bool:
    """Queues that grow without bound: waits late in the run far above those early on, or waits far above
    the service time. (A finite run's drain time says nothing about saturation: with thousands of instances
    and 18 s misses it dominates the span, so completions-per-span would flag every rate.)"""
    return (r["wait_q4_s"] > 2 * r["wait_q2_s"] + r["mean_service_s"]
            or r["mean_wait_s"] > 5 * r["mean_service_s"])


def saturation(n: int, policy: str, args, prefill: float, load: float) -> dict:
    rng = np.random.default_rng(1)
    n_docs = max(200, 8 * n)
    ranks = np.arange(1, n_docs + 1)
    p = ranks ** -args.zipf
    p /= p.sum()
    reqs = max(4000, 30 * n)
    docs = rng.choice(n_docs, size=reqs, p=p)
    pool_docs = int(n_docs * args.pool_fraction)
    local_docs = max(1, pool_docs // n)
    lo, hi, last_ok = 0.0, n * 0.05 / (load * args.tokens + DECODE_S), None
    while hi < 1e6:  # raise the rate until the cluster saturates...
        r = simulate(n, hi, policy, docs, args.tokens, prefill, load, pool_docs, local_docs)
        if saturated(r):
            break
        lo, last_ok, hi = hi, r, hi * 1.5
    for _ in range(8):  # ...then narrow the highest rate it sustains to within 1 %
        mid = (lo + hi) / 2
        r = simulate(n, mid, policy, docs, args.tokens, prefill, load, pool_docs, local_docs)
        if saturated(r):
            hi = mid
        else:
            lo, last_ok = mid, r
    return {"instances": n, "policy": policy, "saturates_at_qps": lo, "at_saturation": last_ok or r}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--costs", help="bench/e2e.py results.json with ttft_by_length")
    ap.add_argument("--tokens", type=int, default=4096, help="context tokens per request")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--pool-fraction", type=float, default=0.5, help="share of documents the pool can hold")
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 64, 256, 1024])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    prefill, load = DEFAULT_PREFILL_S_PER_TOKEN, DEFAULT_LOAD_S_PER_TOKEN
    if a.costs:
        rows = json.load(open(a.costs)).get("ttft_by_length") or []
        if rows:
            big = max(rows, key=lambda r: r["tokens"])
            prefill, load = big["miss_ttft_s"] / big["tokens"], big["hit_ttft_s"] / big["tokens"]
    out = {"prefill_s_per_token": prefill, "load_s_per_token": load, "tokens": a.tokens, "zipf": a.zipf, "rows": []}
    for n in a.sizes:
        s = saturation(n, "shared", a, prefill, load)
        c = saturation(n, "affinity", a, prefill, load)
        out["rows"].append({"instances": n, "shared_pool_least_loaded_qps": s["saturates_at_qps"],
                            "private_affinity_qps": c["saturates_at_qps"],
                            "ratio": s["saturates_at_qps"] / c["saturates_at_qps"],
                            "shared_hit_rate": s["at_saturation"]["hit_rate"],
                            "affinity_hit_rate": c["at_saturation"]["hit_rate"]})
        print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(out))
    else:
        print("| instances | shared pool + least-loaded (QPS) | private + affinity (QPS) | ratio "
              "| hit rate shared / affinity |")
        print("|---|---|---|---|---|")
        for r in out["rows"]:
            print(f"| {r['instances']} | {r['shared_pool_least_loaded_qps']:.2f} | {r['private_affinity_qps']:.2f} | "
                  f"{r['ratio']:.2f}x | {r['shared_hit_rate']:.2f} / {r['affinity_hit_rate']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
