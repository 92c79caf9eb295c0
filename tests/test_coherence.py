"""Coherence: the native instruction sequences exist, and under the simulated non-coherent cache the
protocol serves no stale or torn data, while dropping any one of its flushes makes it fail.

One host's memory is coherent, so the real CXL hazard cannot happen here; the `simulated` mode (a
per-process cache that keeps stale lines until flushed or invalidated) stands in for it, and says so.
"""

from __future__ import annotations

import multiprocessing as mp

import numba
import numpy as np
import pytest
from conftest import SMALL, ServerProcess

from beluga.cxlpool import native
from beluga.kernels import cpu

pytestmark = pytest.mark.timeout(180)


def _asm(dispatcher, *args) -> str:
    """Compile the function afresh (numba does not disassemble cached code) and return its assembly."""
    fresh = numba.njit(dispatcher.py_func)
    fresh(*args)
    return "\n".join(fresh.inspect_asm().values())


def test_native_sequences_are_real_instructions():
    buf = np.zeros(4096, np.uint8)
    addr = native.address(buf)
    flush = _asm(native.flush_range, addr, 256)
    inval = _asm(native.invalidate_range, addr, 256)
    assert "clflushopt" in flush and "sfence" in flush
    assert "clflushopt" in inval and "mfence" in inval
    assert "movnti" in _asm(cpu.copy_nt_checksum, addr, addr + 2048, 1024, 0)


def _block(round_: int, i: int) -> np.ndarray:
    return np.random.default_rng(round_ * 1000 + i).integers(0, 255, SMALL.block_bytes, dtype=np.uint8)


def _key(round_: int, i: int) -> bytes:
    return f"r{round_}-{i}".encode().ljust(32, b"\0")


def _actor(role: str, settings_json: str, inbox, outbox) -> None:
    """A writer or reader process with its own (simulated) cache."""
    from beluga.cxlpool.client import PoolClient
    from beluga.cxlpool.errors import IntegrityError
    from beluga.cxlpool.settings import PoolSettings

    c = PoolClient(PoolSettings.model_validate_json(settings_json), SMALL)
    while (msg := inbox.get()) is not None:
        round_, n = msg
        if role == "writer":
            c.put([_key(round_, i) for i in range(n)], [_block(round_, i) for i in range(n)])
            outbox.put((0, 0, 0))
            continue
        ok = errors = wrong = 0
        hit = c.lookup([_key(round_, i) for i in range(n)])
        for i, (s, g) in enumerate(zip(hit.slots, hit.gens, strict=True)):
            out = np.empty(SMALL.block_bytes, np.uint8)
            try:
                c.read_into(s, g, _key(round_, i), out)
            except IntegrityError:
                errors += 1
                continue
            if (out == _block(round_, i)).all():
                ok += 1
            else:
                wrong += 1
        c.release(hit.slots)
        outbox.put((ok, errors, wrong))
    c.close()


def _run_protocol(pool_settings, drop_writer=(), drop_reader=(), drop_server=()) -> tuple[int, int, int]:
    """Rounds of write-then-read through a pool of few slots, so slots are reused across rounds."""
    base = pool_settings.model_copy(update={"coherence": "simulated", "size": 9 << 20})
    from beluga.cxlpool import pool as pool_mod

    pool_mod.create(base, SMALL).close()  # ~28 slots: every few rounds reuse them
    env = {"BELUGA_POOL_TEST_DROP": __import__("json").dumps(list(drop_server))}
    srv = ServerProcess(base.model_copy(update={"high_watermark": 0.8, "low_watermark": 0.5}), env).start()
    ctx = mp.get_context("spawn")
    q = {name: (ctx.Queue(), ctx.Queue()) for name in ("writer", "reader")}
    procs = []
    for name, drop in (("writer", drop_writer), ("reader", drop_reader)):
        s = base.model_copy(update={"test_drop": list(drop)}).model_dump_json()
        p = ctx.Process(target=_actor, args=(name, s, *q[name]))
        p.start()
        procs.append(p)
    totals = np.zeros(3, int)
    try:
        for r in range(12):
            q["writer"][0].put((r, 8))
            q["writer"][1].get(timeout=60)
            q["reader"][0].put((r, 8))
            totals += q["reader"][1].get(timeout=60)
            q["reader"][0].put((max(r - 1, 0), 8))  # re-read the previous round: cached lines linger
            totals += q["reader"][1].get(timeout=60)
    finally:
        for name in q:
            q[name][0].put(None)
        for p in procs:
            p.join(30)
        srv.stop()
    return tuple(int(x) for x in totals)


def test_simulated_protocol_serves_no_stale_data(pool_settings):
    ok, errors, wrong = _run_protocol(pool_settings)
    assert ok > 50 and errors == 0 and wrong == 0


@pytest.mark.parametrize("drop", ["writer_flush", "reader_invalidate", "header_flush"])
def test_dropping_one_flush_breaks_the_protocol(pool_settings, drop):
    """Proof that the simulated cache has teeth: skip one step and reads fail. The checksum still keeps
    wrong bytes from being served (wrong == 0): they surface as integrity errors, never as data."""
    kw = {"writer_flush": {"drop_writer": [drop]}, "reader_invalidate": {"drop_reader": [drop]},
          "header_flush": {"drop_server": [drop]}}[drop]
    ok, errors, wrong = _run_protocol(pool_settings, **kw)
    assert errors > 0, f"dropping {drop} went unnoticed: the simulated cache would not catch a missing flush"
    assert wrong == 0
