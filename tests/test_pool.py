"""The pool: layout checks, regions, RPC over shared memory and TCP, leases, eviction, admin endpoint."""

from __future__ import annotations

import os
import stat

import httpx
import numpy as np
import pytest
from conftest import SMALL, blocks, keys

from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.errors import PoolFormatError, PoolRefused, PoolUnavailable
from beluga.cxlpool.layout import KVFormat
from beluga.cxlpool.region import Region, RegionError

pytestmark = pytest.mark.timeout(120)


def test_format_mismatch_names_the_field(small_pool):
    other = KVFormat(**{**SMALL.__dict__, "head_dim": 128})
    with pytest.raises(PoolFormatError, match="head_dim: pool has 64, engine has 128"):
        pool_mod.attach(small_pool, other)


def test_not_a_pool_and_missing_pool(pool_settings):
    with pytest.raises(RegionError, match="does not exist"):
        pool_mod.attach(pool_settings)
    with open(pool_settings.path[0], "wb") as f:
        f.write(bytes(1 << 20))
    os.chmod(pool_settings.path[0], 0o600)
    with pytest.raises(PoolFormatError, match="not a Beluga pool"):
        pool_mod.attach(pool_settings)


def test_created_private_and_world_writable_refused(small_pool):
    path = small_pool.path[0]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o666)
    with pytest.raises(RegionError, match="open to every user"):
        pool_mod.attach(small_pool)


def test_too_small_pool_says_how_big(pool_settings):
    with pytest.raises(PoolFormatError, match="use at least"):
        pool_mod.create(pool_settings.model_copy(update={"size": 1 << 20}), SMALL)


def test_interleaved_regions_are_one_flat_pool(tmp_path):
    """Two files interleaved at 64 KiB: logical granule i lands in file i % 2."""
    g = 64 << 10
    paths = [str(tmp_path / "r0"), str(tmp_path / "r1")]
    r = Region.create(paths, 8 * g, interleave=g)
    r.mem[:] = np.repeat(np.arange(8, dtype=np.uint8), g)
    r.close()
    f0, f1 = (np.fromfile(p, np.uint8) for p in paths)
    assert (f0[:g] == 0).all() and (f0[g:2 * g] == 2).all() and (f1[:g] == 1).all() and (f1[3 * g:] == 7).all()


def test_devdax_alignment_rules_with_a_file_standing_in(tmp_path):
    """No CXL device here: a file named like a DAX node takes the device-DAX code path (2 MiB rule)."""
    fake = str(tmp_path / "dax0.0")
    with open(fake, "wb") as f:
        f.truncate(3 << 20)
    os.chmod(fake, 0o600)
    with pytest.raises(RegionError, match="multiples of 2097152"):
        Region.attach(fake, 3 << 20)
    Region.attach(fake, 2 << 20).close()


def test_put_get_longest_prefix_and_stats(server):
    with PoolClient(server.settings, SMALL) as c:
        ks, bs = keys(5), blocks(5)
        assert c.put(ks[:3], bs[:3]) == 3
        got = c.get(ks)  # only the first three are stored
        assert len(got) == 3 and all((g == b).all() for g, b in zip(got, bs, strict=False))
        assert c.put(ks[:4], bs[:4]) == 1  # the three stored ones are skipped
        assert len(c.lookup(ks[1:], lease=False)) == 3
        st = c.stats()
        assert st["committed_blocks"] == 4 and st["leased_slots"] == 0


def test_tcp_transport_sees_the_same_pool(server):
    with PoolClient(server.settings, SMALL) as shm:
        shm.put(keys(2), blocks(2))
    with PoolClient(server.settings.model_copy(update={"transport": "tcp"}), SMALL) as tcp:
        assert len(tcp.get(keys(2))) == 2


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_leased_blocks_are_never_evicted(small_pool, policy):
    from conftest import ServerProcess

    # One client leases the whole pool here: lift the per-client quota (tested in test_trust.py).
    server = ServerProcess(small_pool.model_copy(update={"eviction": policy}),
                           {"BELUGA_POOL_CLIENT_QUOTA": "1"}).start()
    try:
        _fill_past_capacity_while_leased(server)
    finally:
        server.stop()


def _fill_past_capacity_while_leased(server):
    with PoolClient(server.settings, SMALL) as c:
        n = c.geo.n_slots
        first = keys(4, b"first")
        c.put(first, blocks(4))
        hit = c.lookup(first)  # leased
        for i in range(3):  # overfill the pool several times
            c.put(keys(n, b"fill%d" % i), blocks(n, seed=i))
        assert len(c.lookup(first, lease=False)) == 4
        everything = c.lookup(keys(n, b"fill2"))  # lease what is left: nothing can be evicted now
        assert c.alloc(keys(n, b"more"))[-1][0] == -1  # a full pool says "no room"; the caller computes
        c.release(everything.slots)
        c.release(hit.slots)
        c.put(keys(n, b"again"), blocks(n, seed=9))
        assert len(c.lookup(first, lease=False)) == 0  # unleased: now evictable
        st = c.stats()
        assert st["evictions"] > 0 and st["used_slots"] <= n


def test_dead_client_leases_are_reaped(server):
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from conftest import SMALL; from beluga.cxlpool.client import PoolClient;"
        "from beluga.cxlpool.settings import PoolSettings; import numpy as np;"
        f"c = PoolClient(PoolSettings.model_validate_json({server.settings.model_dump_json()!r}), SMALL);"
        "k=[b'x'.ljust(32, b'\\0')]; c.put(k, [np.zeros(SMALL.block_bytes, np.uint8)]); c.lookup(k);"
        "import os; os._exit(0)"  # dies holding a lease
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    deadline = __import__("time").monotonic() + 10
    while server.stats()["leased_slots"] and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.2)
    assert server.stats()["leased_slots"] == 0


def test_admin_endpoint(server):
    base = f"http://127.0.0.1:{server.settings.admin_port}"
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert "beluga_pool_slots" in httpx.get(base + "/metrics").text
    assert httpx.get(base + "/stats").json()["format"]["model"] == "test-model"
    assert httpx.get(base + "/nope").status_code == 404


def test_bad_input_is_refused_and_server_keeps_working(server):
    with PoolClient(server.settings, SMALL) as c:
        with pytest.raises(ValueError, match="32 bytes"):
            c.lookup([b"short"])
        with pytest.raises(ValueError, match="exactly one block|format needs"):
            c.write(0, np.zeros(10, np.uint8))
        with pytest.raises(PoolRefused, match="outside the pool"):
            c.commit([(10**6, 1, 0, keys(1)[0])])  # not a slot of the pool: the whole request is refused, no crash
        assert c.commit([(5, 1, 0, keys(1)[0])]) == 0  # a slot this client is not writing: not accepted
        c.put(keys(1), blocks(1))
        assert len(c.get(keys(1))) == 1


def test_no_server_fails_fast_with_a_clear_error(small_pool):
    s = small_pool.model_copy(update={"rpc_timeout_s": 0.3})
    with PoolClient(s, SMALL) as c, pytest.raises(PoolUnavailable, match="beluga pool serve"):
        c.lookup(keys(1))
