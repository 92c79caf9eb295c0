"""Crashes: a writer killed mid-write and a metadata server killed mid-work never cost committed blocks and
never make anyone read a partial block."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import SMALL

from beluga.cxlpool.client import PoolClient

pytestmark = pytest.mark.timeout(180)

WRITER = """
import sys, time, random, numpy as np
sys.path.insert(0, 'tests')
from conftest import SMALL
from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.settings import PoolSettings
c = PoolClient(PoolSettings.model_validate_json(sys.argv[1]), SMALL)
i = int(sys.argv[2])
while True:
    key = f"w{i}".encode().ljust(32, b"\\0")
    data = np.random.default_rng(i).integers(0, 255, SMALL.block_bytes, dtype=np.uint8)
    [(slot, gen)] = c.alloc([key])
    if slot >= 0:
        view = c.slot_view(slot)
        view[: data.size // 2] = data[: data.size // 2]   # half the block ...
        time.sleep(random.random() * 0.004)                # ... a kill may land here ...
        csum = c.write(slot, data)
        time.sleep(random.random() * 0.002)                # ... or here, before the commit
        c.commit([(slot, gen, csum, key)])
    print(i, flush=True)
    i += 1
"""


def _expected(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, SMALL.block_bytes, dtype=np.uint8)


def _key(i: int) -> bytes:
    return f"w{i}".encode().ljust(32, b"\0")


def test_writer_killed_mid_write_never_serves_a_partial_block(server):
    start = 0
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", WRITER, server.settings.model_dump_json(), str(start)],
                             stdout=subprocess.PIPE, text=True)
        time.sleep(1.0 + random.random())  # start-up, then a few hundred blocks
        p.send_signal(signal.SIGKILL)
        out = p.communicate(timeout=30)[0].split()
        start = int(out[-1]) + 2 if out else start + 1
    with PoolClient(server.settings, SMALL) as c:
        served = 0
        for i in range(start):
            hit = c.lookup([_key(i)])
            for s, g in zip(hit.slots, hit.gens, strict=True):
                out = np.empty(SMALL.block_bytes, np.uint8)
                c.read_into(s, g, _key(i), out)  # raises on a partial block
                assert (out == _expected(i)).all()
                served += 1
            c.release(hit.slots)
        assert served > 0
        deadline = time.monotonic() + 10
        while c.stats()["writing_slots"] and time.monotonic() < deadline:
            time.sleep(0.2)
        st = c.stats()
        assert st["writing_slots"] == 0 and st["reclaimed_slots"] >= 1  # the killed writers' slots came back


def test_server_killed_and_restarted_keeps_every_committed_block(server):
    settings = server.settings.model_copy(update={"rpc_timeout_s": 20})
    committed: list[int] = []
    stop = threading.Event()

    def work():
        with PoolClient(settings, SMALL) as c:
            i = 0
            while not stop.is_set() and i < 1200:  # stays under the eviction watermark
                if c.put([_key(i)], [_expected(i)]) == 1:
                    committed.append(i)
                i += 1
                time.sleep(0.001)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(1.5)
    server.kill()  # mid-work
    before = list(committed)
    time.sleep(0.5)
    server.start()  # the client in the thread goes on by itself
    time.sleep(1.5)
    stop.set()
    t.join(30)
    assert not t.is_alive()
    assert len(before) > 10 and len(committed) > len(before)  # work resumed without any reconnect call
    with PoolClient(settings, SMALL) as c:
        for i in committed:
            [data] = c.get([_key(i)])
            assert (data == _expected(i)).all()
        assert c.stats()["committed_blocks"] >= len(committed)
