"""The pool trusts no one: each finding of the trust review, as a test that failed before and passes now.

Hostile clients are written here by hand (raw frames, raw slot words): what a process that does not run
our client would send. Multi-host findings (PID namespaces, hosts killed mid-save) are in
test_multihost.py.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import SMALL, ServerProcess, blocks, keys
from pydantic import ValidationError

from beluga.cxlpool import native
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.errors import IntegrityError, PoolFormatError, PoolRefused, PoolUnavailable
from beluga.cxlpool.layout import HEADER_BYTES, SERVER_STATUS, KVFormat
from beluga.cxlpool.protocol import (
    CHALLENGE_BYTES,
    REQ_FRAME,
    RESP_FRAME,
    W_CLAIM,
    Op,
    Status,
    proof,
    recv_exact,
)
from beluga.cxlpool.region import RegionError
from beluga.cxlpool.server.service import claim_pool
from beluga.cxlpool.settings import PoolSettings
from beluga.workers.connector import rank_key
from beluga.workers.kvformat import from_model_dir, model_id_for

pytestmark = pytest.mark.timeout(120)


class RawTcp:
    """A client that speaks the wire protocol by hand: authenticated or not, well-formed or not."""

    def __init__(self, settings: PoolSettings, token: bytes | None = None):
        self.sock = socket.create_connection(("127.0.0.1", settings.tcp_port), timeout=10)
        first = self.reply()
        self.challenge, self.token, self.seq = first[-1], 0, 0
        if token is not None:
            status, *_, ret, _ = self.call(Op.HELLO, 0, proof(token, self.challenge))
            assert status == Status.OK
            self.token = ret[2]

    def send(self, op: int, n: int, payload: bytes = b"", plen: int | None = None) -> None:
        self.seq += 1
        self.sock.sendall(REQ_FRAME.pack(op, n, self.token, self.seq, 0, 0, 0, 0,
                                         len(payload) if plen is None else plen) + payload)

    def reply(self):
        status, n, token, seq, r0, r1, r2, r3, plen = RESP_FRAME.unpack(recv_exact(self.sock, RESP_FRAME.size))
        return status, n, (r0, r1, r2, r3), recv_exact(self.sock, plen) if plen else b""

    def call(self, op: int, n: int, payload: bytes = b""):
        self.send(op, n, payload)
        return self.reply()


def committed(server: ServerProcess) -> int:
    return server.stats()["committed_blocks"]


# -- two clients in one process ------------------------------------------------------------------------------
def test_two_clients_in_one_process_have_their_own_slots_and_replies(server):
    """Found: both clients took the RPC slot owned by their pid and read each other's replies (80 of 160
    reads returned another key's block). vLLM's single-GPU layout runs two clients in one process."""
    a, b = PoolClient(server.settings, SMALL), PoolClient(server.settings, SMALL)
    try:
        a.ping()
        b.ping()
        assert a.rpc.slot != b.rpc.slot
        ka, kb = keys(8, b"a"), keys(8, b"b")
        a.put(ka, blocks(8, 1))
        b.put(kb, blocks(8, 2))
        wrong = []

        def reader(c, ks, seed):
            want = blocks(8, seed)
            for _ in range(20):
                got = c.get(ks)
                wrong.extend(i for i, g in enumerate(got) if not (g == want[i]).all())
                assert len(got) == 8

        threads = [threading.Thread(target=reader, args=(a, ka, 1)), threading.Thread(target=reader, args=(b, kb, 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert wrong == []
        slots = a.alloc(keys(4, b"x")) + b.alloc(keys(4, b"y"))
        assert all(0 <= s < a.geo.n_slots for s, _ in slots)
    finally:
        a.close()
        b.close()


# -- identity and liveness -----------------------------------------------------------------------------------
def test_a_live_client_keeps_its_leases_and_writes_past_the_heartbeat_timeout(small_pool):
    """Found: liveness was os.kill(pid, 0), so a live client the server could not see (another PID
    namespace) lost its leases and writes. Now the heartbeat decides."""
    srv = ServerProcess(small_pool.model_copy(update={"heartbeat_timeout_s": 1.0})).start()
    try:
        with PoolClient(small_pool.model_copy(update={"heartbeat_timeout_s": 1.0}), SMALL) as c:
            c.put(keys(4), blocks(4))
            hit = c.lookup(keys(4))
            [(slot, gen)] = c.alloc(keys(1, b"w"))
            time.sleep(2.5)  # well past the timeout: only the heartbeat thread speaks
            assert srv.stats()["leased_slots"] == 4
            assert c.commit([(slot, gen, c.write(slot, blocks(1)[0]), keys(1, b"w")[0])]) == 1
            c.release(hit.slots)
    finally:
        srv.stop()


def test_a_stopped_client_is_reaped_and_comes_back_with_a_new_session(small_pool):
    """A client that stops (SIGSTOP, a hung host) loses its leases after the timeout; when it resumes,
    its next call opens a new session by itself."""
    s = small_pool.model_copy(update={"heartbeat_timeout_s": 1.0})
    srv = ServerProcess(s).start()
    code = (
        "import sys, os, signal, numpy as np; sys.path.insert(0, 'tests'); from conftest import SMALL;"
        "from beluga.cxlpool.client import PoolClient; from beluga.cxlpool.settings import PoolSettings;"
        f"c = PoolClient(PoolSettings.model_validate_json({s.model_dump_json()!r}), SMALL);"
        "k = [b'z'.ljust(32, b'\\0')]; c.put(k, [np.zeros(SMALL.block_bytes, np.uint8)]); c.lookup(k);"
        "print('leased', flush=True); sys.stdin.readline(); print(len(c.get(k)), flush=True)"
    )
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "leased"
        p.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while srv.stats()["leased_slots"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.stats()["leased_slots"] == 0 and srv.stats()["clients_reaped"] >= 1
        p.send_signal(signal.SIGCONT)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "1"  # served again, on a new session
    finally:
        p.kill()
        srv.stop()


def test_a_timed_out_call_leaves_no_lease_behind(server):
    """Found: a call that timed out was still executed later and its leases were never released."""
    with PoolClient(server.settings, SMALL) as w:
        w.put(keys(4), blocks(4))
    c = PoolClient(server.settings.model_copy(update={"rpc_timeout_s": 0.3}), SMALL)
    try:
        c.ping()
        server.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(PoolUnavailable):
            c.lookup(keys(4))
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # the server answers the old call late and takes the leases...
        c.ping()  # ...and the client's next call, on a new session, ends the old one
        assert server.stats()["leased_slots"] == 0
    finally:
        server.proc.send_signal(signal.SIGCONT)
        c.close()


# -- quotas and write timeouts ---------------------------------------------------------------------------------
def test_one_client_cannot_take_every_slot(server):
    """Found: one client took every slot for writing; the others got "no room" until it disconnected."""
    with PoolClient(server.settings, SMALL) as greedy, PoolClient(server.settings, SMALL) as other:
        n = greedy.geo.n_slots
        got = greedy.alloc(keys(n, b"g"))
        assert 0 < sum(s >= 0 for s, _ in got) <= n // 2
        assert other.alloc(keys(1, b"o"))[0][0] >= 0
        assert server.stats()["quota_refusals"] >= 1


def test_slots_left_writing_are_reclaimed_while_the_client_lives(small_pool):
    srv = ServerProcess(small_pool, {"BELUGA_POOL_WRITE_TIMEOUT_S": "1"}).start()
    try:
        with PoolClient(small_pool, SMALL) as c:
            [(slot, gen)] = c.alloc(keys(1))
            time.sleep(2.0)
            assert srv.stats()["writing_slots"] == 0 and srv.stats()["expired_writes"] == 1
            assert c.commit([(slot, gen, 0, keys(1)[0])]) == 0  # the late commit is refused
    finally:
        srv.stop()


# -- authentication -----------------------------------------------------------------------------------------
def test_tcp_without_the_pool_token_changes_nothing(server):
    """Found: anyone reaching the TCP port wiped 100 of 100 blocks, and a client that never mapped the pool
    committed a zero checksum that readers accepted."""
    with PoolClient(server.settings, SMALL) as c:
        c.put(keys(100), blocks(100))
    before = committed(server)
    raw = RawTcp(server.settings)  # no token
    status, *_ = raw.call(Op.ALLOC, 100, b"".join(keys(100, b"evil")))
    assert status == Status.AUTH
    wrong = RawTcp(server.settings)
    status, *_ = wrong.call(Op.HELLO, 0, proof(b"not the pool token at all", wrong.challenge))
    assert status == Status.AUTH
    bad = server.settings.model_copy(update={"transport": "tcp", "token_file": str(_token_file(b"x" * 32))})
    with pytest.raises(PoolRefused, match="refused HELLO"):
        PoolClient(bad, SMALL).ping()
    assert committed(server) == before
    with PoolClient(server.settings, SMALL) as c:
        assert len(c.get(keys(100))) == 100


def _token_file(data: bytes) -> str:
    import tempfile

    fd, path = tempfile.mkstemp()
    os.write(fd, data)
    os.close(fd)
    return path


def test_token_file_must_be_private_and_present(small_pool):
    tok = small_pool.token_path()
    os.chmod(tok, 0o644)
    with pytest.raises(PoolRefused, match="readable by every user"):
        pool_mod.read_token(tok)
    os.unlink(tok)
    with pytest.raises(PoolRefused, match="cannot read the pool token"):
        pool_mod.read_token(tok)


# -- effects before checks, unbounded work ---------------------------------------------------------------------
def test_malformed_requests_change_nothing(server):
    """Found: one 44-byte ALLOC frame (n = 2^20, no payload) evicted every committed block before failing;
    a LOOKUP claiming 2^24 keys froze every client for 1.5 s."""
    with PoolClient(server.settings, SMALL) as c:
        c.put(keys(50), blocks(50))
        before = committed(server)
        token = pool_mod.read_token(server.settings.token_path())
        raw = RawTcp(server.settings, token)
        for op, n, payload in [(Op.ALLOC, 1 << 20, b""), (Op.LOOKUP, 1 << 24, b""), (Op.ALLOC, 2, b"x" * 63),
                               (Op.COMMIT, 1, struct.pack("<IIQ", 1 << 30, 1, 0)), (Op.RELEASE, 1, b"\xff" * 4),
                               (Op.BAD, 1, struct.pack("<II", 1 << 31, 1)), (99, 0, b"")]:
            t0 = time.perf_counter()
            status, _, _, why = raw.call(op, n, payload)
            assert status == Status.ERROR and why, (op, n)
            assert time.perf_counter() - t0 < 0.5
        # the same through shared memory, words written by hand
        r = c.rpc._call(Op.ALLOC, 1 << 20, (0, 0, 0, 0), b"")
        assert r.status == Status.ERROR
        assert committed(server) == before
        assert len(c.get(keys(50))) == 50


def test_frames_are_capped_and_idle_connections_time_out(server):
    """Found: a frame announcing 4 GiB was buffered (+300 MB of server memory); no socket timeout."""
    rss = _rss_mb(server.proc.pid)
    raw = RawTcp(server.settings)
    raw.send(Op.HELLO, 0, b"", plen=(4 << 30) - 1)
    status, _, _, why = raw.reply()
    assert status == Status.ERROR and b"cap" in why
    assert _rss_mb(server.proc.pid) < rss + 20
    idle = socket.create_connection(("127.0.0.1", server.settings.tcp_port), timeout=10)
    idle.recv(RESP_FRAME.size + CHALLENGE_BYTES)
    t0 = time.monotonic()
    assert idle.recv(1) == b""  # closed by the server: a handshake has 5 s
    assert time.monotonic() - t0 < 8


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# -- one server per pool ----------------------------------------------------------------------------------------
def test_a_second_server_on_one_pool_is_refused(server):
    """Found: two servers on one pool both committed (3 wrong blocks in 200 cycles)."""
    with pytest.raises(RuntimeError, match="another metadata server"):
        ServerProcess(server.settings.model_copy(update={"tcp_port": server.settings.tcp_port + 1,
                                                         "admin_port": server.settings.admin_port + 1})).start()
    with PoolClient(server.settings, SMALL) as c:
        c.put(keys(3), blocks(3))
        assert len(c.get(keys(3))) == 3


def test_a_server_beating_on_another_host_is_refused(small_pool):
    """Across hosts only the memory is shared: a status page whose beat still moves means a live server."""
    p = pool_mod.attach(small_pool, data=False)
    status = np.ndarray(1, SERVER_STATUS, buffer=p.mem, offset=4096)
    status["pid"] = 12345
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            status["beat"] += 1

    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(PoolRefused, match="on another host"):
            claim_pool(small_pool.path[0], p.mem)
    finally:
        stop.set()
        t.join()
    fd = claim_pool(small_pool.path[0], p.mem)  # the beat stopped: the pool may be taken over
    os.close(fd)
    p.close()


# -- the client trusts no server ----------------------------------------------------------------------------
def test_a_fake_server_cannot_make_the_client_touch_memory_outside_the_pool(small_pool):
    """Found: a fake listener answering ALLOC with slot 2^40 crashed the client with SIGSEGV."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    def fake():
        conn, _ = lsock.accept()
        conn.sendall(RESP_FRAME.pack(0, 0, 0, 0, 0, 0, 0, 0, CHALLENGE_BYTES) + b"c" * CHALLENGE_BYTES)
        while True:
            try:
                op, n, token, seq, *_, plen = REQ_FRAME.unpack(recv_exact(conn, REQ_FRAME.size))
            except ConnectionError:
                return
            recv_exact(conn, plen)
            if op == Op.HELLO:
                conn.sendall(RESP_FRAME.pack(0, 0, token, seq, 9, 9, 77, 0, 0))
            else:
                body = np.array([1 << 40] * n, np.int64).tobytes() + bytes(4 * n)
                conn.sendall(RESP_FRAME.pack(0, n, token, seq, 0, 0, 0, 0, len(body)) + body)

    threading.Thread(target=fake, daemon=True).start()
    s = small_pool.model_copy(update={"transport": "tcp", "tcp_port": port})
    with PoolClient(s, SMALL) as c:
        with pytest.raises(PoolRefused, match="outside the pool"):
            c.alloc(keys(2))
        with pytest.raises(PoolRefused, match="outside the pool"):
            c.write(1 << 40, blocks(1)[0])
    lsock.close()


# -- readers check the key --------------------------------------------------------------------------------------
def test_a_slot_holding_another_key_is_a_miss_never_data(server):
    """Found: reads checked generation and checksum but not the key, so any mix-up served another prefix's
    (or tenant's) KV with a valid checksum."""
    with PoolClient(server.settings, SMALL) as c:
        c.put(keys(2), blocks(2))
        hit = c.lookup(keys(2))
        off = c.geo.hdr_off + hit.slots[1] * HEADER_BYTES
        c.mem[off + 24: off + 56] = np.frombuffer(keys(1, b"other")[0], np.uint8)  # the header's key field
        out = np.empty(SMALL.block_bytes, np.uint8)
        c.read_into(hit.slots[0], hit.gens[0], keys(2)[0], out)
        with pytest.raises(IntegrityError, match="another key"):
            c.read_into(hit.slots[1], hit.gens[1], keys(2)[1], out)
        c.release(hit.slots)


# -- settings that two processes must agree on --------------------------------------------------------------
def test_the_pool_describes_itself_and_disagreeing_settings_are_refused(pool_settings):
    """Found: the chart ran the server `native`, connectors defaulted to `coherent`, silently."""
    pool_mod.create(pool_settings.model_copy(update={"coherence": "native", "transports": ["tcp"]}), SMALL).close()
    p = pool_mod.attach(pool_settings)  # no setting: the pool's
    assert p.svc.coherence == "native" and p.svc.transports == ("tcp",)
    p.close()
    for update, msg in [({"coherence": "coherent"}, "coherence: pool has 'native', setting says 'coherent'"),
                        ({"transport": "shm"}, "transport: pool serves tcp, setting says 'shm'")]:
        with pytest.raises(PoolFormatError, match=msg):
            pool_mod.attach(pool_settings.model_copy(update=update))


def test_test_only_flush_dropping_is_refused_outside_the_simulator():
    with pytest.raises(ValidationError, match="simulated coherence mode only"):
        PoolSettings(test_drop=["writer_flush"])
    with pytest.raises(ValidationError, match="simulated coherence mode only"):
        PoolSettings(test_drop=["writer_flush"], coherence="native")
    PoolSettings(test_drop=["writer_flush"], coherence="simulated")


def test_model_identity_is_its_content_not_its_folder_name(tmp_path):
    """Found: the model's identity was the folder's basename."""
    a, b = tmp_path / "a" / "llama", tmp_path / "b" / "llama"
    for d, layers in ((a, 2), (b, 3)):
        d.mkdir(parents=True)
        (d / "config.json").write_text(f'{{"num_attention_heads": 4, "hidden_size": 256, '
                                       f'"num_hidden_layers": {layers}, "num_key_value_heads": 2}}')
        (d / "model.safetensors").write_bytes(b"w" * 100)
    assert model_id_for(a) != model_id_for(b)
    (b / "config.json").write_text((a / "config.json").read_text())
    assert model_id_for(a) == model_id_for(b)  # same content, same identity, wherever it lives
    (b / "model.safetensors").write_bytes(b"v" * 100)
    assert model_id_for(a) != model_id_for(b)


# -- file permissions guard the shared-memory path -------------------------------------------------------------
def test_create_never_follows_links_or_reuses_a_file(pool_settings, tmp_path):
    """Found: `pool create` followed symlinks, and attach accepted another user's or a public pool."""
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, pool_settings.path[0])
    with pytest.raises(RegionError, match="already exists"):
        pool_mod.create(pool_settings, SMALL)
    assert target.read_bytes() == b"precious"
    with pytest.raises(RegionError, match="symbolic link"):
        pool_mod.attach(pool_settings)


def test_attach_refuses_a_pool_owned_by_another_user(small_pool):
    path = small_pool.path[0]
    os.chown(path, 65534, 65534)
    with pytest.raises(RegionError, match="belongs to uid 65534"):
        pool_mod.attach(small_pool)
    os.chmod(path, 0o640)
    with pytest.raises(RegionError, match="belongs to uid 65534"):
        pool_mod.attach(small_pool)


# -- parallel ranks --------------------------------------------------------------------------------------------
def test_ranks_store_their_own_shards_and_a_world_size_mismatch_is_refused(small_pool, tmp_path):
    """Found: with TP=2 both ranks saved under one key and loaded one rank's shard."""
    k = keys(1)[0]
    assert rank_key(k, 0, 1) == k
    assert len({rank_key(k, r, 2) for r in range(2)} | {rank_key(k, r, 4) for r in range(4)}) == 6
    tp2 = KVFormat(**{**SMALL.__dict__, "tp_size": 2})
    with pytest.raises(PoolFormatError, match="tp_size: pool has 1, engine has 2"):
        pool_mod.attach(small_pool, tp2)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"num_attention_heads": 4, "hidden_size": 256, "num_hidden_layers": 4, '
                                   '"num_key_value_heads": 2}')
    f = from_model_dir(d, tp_size=2, pp_size=2)
    assert (f.kv_heads, f.layers, f.tp_size, f.pp_size) == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="do not split evenly"):
        from_model_dir(d, tp_size=4)


def test_admin_endpoint_is_read_only(server):
    base = f"http://127.0.0.1:{server.settings.admin_port}"
    for method in ("POST", "PUT", "DELETE"):
        assert httpx.request(method, base + "/stats").status_code in (404, 405, 501)
    assert server.stats()["sessions"] >= 0


def test_the_rpc_slot_is_freed_when_a_client_closes(server):
    with PoolClient(server.settings, SMALL) as c:
        c.ping()  # a slot is claimed at the first call
        assert int(native.atomic_load(c.rpc._word(W_CLAIM))) == c.rpc.claim
        first = c.rpc.slot
    with PoolClient(server.settings, SMALL) as c:
        c.ping()
        assert c.rpc.slot == first



# -- found by review of the change ---------------------------------------------------------------------------
def test_a_hello_without_the_slots_claim_opens_no_session(server):
    """A client that lost its slot (reaped while it stood still) and writes into it late must not open a
    session there, nor be answered as the new owner."""
    with PoolClient(server.settings, SMALL) as c:
        c.ping()
        t = c.rpc
        out = np.zeros(8, np.uint64)
        t.seq += 1
        if not native.client_call(t.slot_addr, int(Op.HELLO), t.claim ^ 2, 0, 0, 0, 0, 0, t.seq, 10**7, out):
            t._wait_slow(t.seq)
            native.read_reply(t.slot_addr, out)
        assert int(out[0]) & 0xFFFFFFFF == Status.ERROR and int(out[7]) == t.claim ^ 2
        c.ping()  # the rightful session goes on
        assert server.stats()["sessions"] == 1


def test_a_commit_under_another_key_is_refused_and_its_slot_freed(server):
    with PoolClient(server.settings, SMALL) as c:
        [(slot, gen)] = c.alloc(keys(1, b"mine"))
        csum = c.write(slot, blocks(1)[0])
        assert c.commit([(slot, gen, csum, keys(1, b"else")[0])]) == 0
        st = server.stats()
        assert st["key_mismatches"] == 1 and st["writing_slots"] == 0 and st["committed_blocks"] == 0
        assert c.lookup(keys(1, b"mine")).slots == [] and c.lookup(keys(1, b"else")).slots == []


def test_a_false_bad_report_drops_nothing(server):
    """A session reporting good blocks as bad cannot empty the cache: the server checks first."""
    with PoolClient(server.settings, SMALL) as c:
        c.put(keys(4), blocks(4))
        hit = c.lookup(keys(4), lease=False)
        c.report_bad(list(zip(hit.slots, hit.gens, strict=True)))
        assert len(c.get(keys(4))) == 4 and server.stats()["false_reports"] == 4
        c.mem[c.slot_offset(hit.slots[2]) + 5] ^= 0xFF  # a real corruption
        c.report_bad([(hit.slots[2], hit.gens[2])])
        assert len(c.get(keys(4))) == 2 and server.stats()["integrity_failures"] == 1


def test_a_trickling_handshake_is_cut_at_its_deadline(server):
    s = socket.create_connection(("127.0.0.1", server.settings.tcp_port), timeout=10)
    s.recv(RESP_FRAME.size + CHALLENGE_BYTES)
    t0 = time.monotonic()
    try:
        for _ in range(20):
            s.sendall(b"\0")  # one byte a second: each recv would be in time, the handshake is not
            time.sleep(1)
    except OSError:
        pass
    assert time.monotonic() - t0 < 8
    s.close()


def test_a_server_that_stalls_after_its_challenge_is_unavailable_not_a_crash(small_pool):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def stall():
        conn, _ = lsock.accept()
        conn.sendall(RESP_FRAME.pack(0, 0, 0, 0, 0, 0, 0, 0, CHALLENGE_BYTES) + b"c" * CHALLENGE_BYTES)
        time.sleep(3)
        conn.close()

    threading.Thread(target=stall, daemon=True).start()
    s = small_pool.model_copy(update={"transport": "tcp", "tcp_port": lsock.getsockname()[1], "rpc_timeout_s": 0.5})
    with PoolClient(s, SMALL) as c, pytest.raises(PoolUnavailable):
        c.ping()
    lsock.close()


def test_after_a_restart_half_written_slots_are_handed_out_last(small_pool):
    from beluga.cxlpool.coherence import make
    from beluga.cxlpool.server.index import PoolIndex

    p = pool_mod.attach(small_pool, data=False)
    ix = PoolIndex(p.mem, p.geo, make("coherent", p.mem))
    ix._write_header(0, 1, 0, 0, keys(1)[0])  # slot 0 was being written when the server died
    ix = PoolIndex(p.mem, p.geo, make("coherent", p.mem))
    order = [ix.free.pop() for _ in range(3)]
    assert 0 not in order and order == [1, 2, 3]
    p.close()
