"""A pool client that tests run as a process on a simulated host (tests/hosts.py): it prints one JSON line
per event, so the test reads what happened on hosts it cannot reach itself.

    python tests/pool_actor.py ROLE SETTINGS_JSON [ARG]

Roles: `holder` (leases blocks and holds a slot for writing across several heartbeat timeouts, then
checks it kept them), `writer` (writes blocks forever, pausing mid-write), `reader` (reads and verifies
blocks forever, counting wrong bytes), `stats` (the server's statistics, once).
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

import numpy as np

from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.errors import PoolError
from beluga.cxlpool.settings import PoolSettings


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def key(tag: str, i: int) -> bytes:
    return f"{tag}{i}".encode().ljust(32, b"\0")


def block(tag: str, i: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(f"{tag}/{i}".encode())).integers(0, 255, nbytes, dtype=np.uint8)


def holder(c: PoolClient, tag: str) -> None:
    nb = c.fmt.block_bytes
    ks = [key(tag, i) for i in range(3)]
    c.put(ks, [block(tag, i, nb) for i in range(3)])
    hit = c.lookup(ks)
    [(slot, gen)] = c.alloc([key(tag + "-w", 0)])
    say(event="holding", pid=os.getpid(), rpc_slot=getattr(c.rpc, "slot", -1), leased=len(hit))
    sys.stdin.readline()  # the test waits past the heartbeat timeout, then lets us go on
    accepted = c.commit([(slot, gen, c.write(slot, block(tag + "-w", 0, nb)), key(tag + "-w", 0))])
    out = np.empty(nb, np.uint8)
    good = 0
    for i, (s, g) in enumerate(zip(hit.slots, hit.gens, strict=True)):
        c.read_into(s, g, ks[i], out)
        good += int((out == block(tag, i, nb)).all())
    c.release(hit.slots)
    say(event="done", committed=accepted, good_reads=good)


def writer(c: PoolClient, tag: str) -> None:
    nb = c.fmt.block_bytes
    c.put([key(tag, 0)], [block(tag, 0, nb)])
    lease = c.lookup([key(tag, 0)])  # a lease the server must take back when this host dies
    i = 1
    while True:
        data = block(tag, i, nb)
        [(slot, gen)] = c.alloc([key(tag, i)])
        if slot >= 0:
            view = c.slot_view(slot)
            view[: nb // 2] = data[: nb // 2]  # half the block: a host may die here ...
            time.sleep(0.01)
            csum = c.write(slot, data)
            c.commit([(slot, gen, csum, key(tag, i))])
        say(event="wrote", i=i, leased=len(lease))
        i += 1


def reader(c: PoolClient, tag: str) -> None:
    nb = c.fmt.block_bytes
    out = np.empty(nb, np.uint8)
    reads = wrong = errors = 0
    deadline = time.monotonic() + float(os.environ.get("ACTOR_SECONDS", "20"))
    while time.monotonic() < deadline:
        ks = [key(tag, i) for i in range(200)]
        try:
            hit = c.lookup(ks)
            for i, (s, g) in enumerate(zip(hit.slots, hit.gens, strict=True)):
                try:
                    c.read_into(s, g, ks[i], out)
                except PoolError:
                    errors += 1  # a miss, never data
                    continue
                reads += 1
                wrong += int((out != block(tag, i, nb)).sum())
            c.release(hit.slots)
        except PoolError:
            errors += 1
        st = c.stats()
        say(event="read", reads=reads, wrong_bytes=wrong, errors=errors, writing=st["writing_slots"],
            leased=st["leased_slots"], reaped=st["clients_reaped"], t=time.monotonic())
        time.sleep(0.05)


def main() -> None:
    role, settings = sys.argv[1], PoolSettings.model_validate_json(sys.argv[2])
    tag = sys.argv[3] if len(sys.argv) > 3 else "b"
    with PoolClient(settings) as c:
        if role == "stats":
            say(**c.stats())
        else:
            {"holder": holder, "writer": writer, "reader": reader}[role](c, tag)


if __name__ == "__main__":
    main()
