"""`beluga pool bench`: the pool's own numbers, each beside its reference, measured in one run.

The metadata server runs in its own process (as in production); client and server are pinned to
different cores when the machine has two, since an unpinned ping-pong measures the scheduler.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np

from beluga.cxlpool import native
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.coherence import make as make_coherence
from beluga.cxlpool.layout import KVFormat
from beluga.cxlpool.settings import PoolSettings
from beluga.kernels import cpu

# The bundled model's block: 30 layers x K,V x 128 tokens x 3 heads x 64 dims x fp32 = 5.9 MB.
BUNDLED = KVFormat("bench", "float32", 30, 3, 64, 128, "cpu", "bench")
TINY = KVFormat("bench-index", "float32", 1, 1, 8, 2, "cpu", "bench")  # 128-byte blocks: index size tests


_ports: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this run. Also used by bench/ scripts and the tests,
    which start several servers each, seconds after choosing their ports. It lies below the kernel's
    ephemeral range where there is room, so that no process's outgoing connection or bind-to-any-port
    (vLLM picks its internal ports so) takes it in between; one such race failed an engine's start."""
    low = _ephemeral_low()
    for _ in range(200):
        if low > 12000:
            port = random.randrange(10000, low)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        if port in _ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports.add(port)
        return port
    raise RuntimeError("no free loopback port found")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class _Server:
    def __init__(self, settings: PoolSettings, core: int | None):
        cmd = [sys.executable, "-m", "beluga", "pool", "serve", "--no-create", "--path", settings.path[0],
               "--tcp-port", str(settings.tcp_port), "--admin-port", str(settings.admin_port), "--spin-us",
               str(settings.spin_us)]
        env = dict(os.environ, BELUGA_POOL_HIGH_WATERMARK=str(settings.high_watermark),
                   BELUGA_POOL_LOW_WATERMARK=str(settings.low_watermark))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if core is not None:
            os.sched_setaffinity(self.proc.pid, {core})
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{settings.admin_port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("bench: metadata server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def _settings(size: int, **kw) -> PoolSettings:
    return PoolSettings(path=[f"/dev/shm/beluga-bench-{uuid.uuid4().hex[:8]}"], size=size, tcp_port=free_port(),
                        admin_port=free_port(), spin_us=5_000_000, **kw)


def _cleanup(s: PoolSettings) -> None:
    for p in (s.path[0], s.path[0] + ".bell", s.path[0] + ".token"):
        if os.path.exists(p):
            os.unlink(p)


def _latencies(fn, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t
    return out / 1000.0


def _gbps(nbytes: int, fn, repeat: int = 5) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@contextlib.contextmanager
def _server_beside(s: PoolSettings):
    """A metadata server on core 0 and this process on core 1 (when there are two): a ping-pong between
    unpinned processes measures the scheduler."""
    two_cores = len(os.sched_getaffinity(0)) >= 2
    srv = _Server(s, 0 if two_cores else None)
    old_aff = os.sched_getaffinity(0)
    if two_cores:
        os.sched_setaffinity(0, {1})
    try:
        yield srv
    finally:
        os.sched_setaffinity(0, old_aff)
        srv.stop()
        _cleanup(s)


def rpc_and_data(quick: bool) -> dict:
    s = _settings(1 << 30)
    pool_mod.create(s, BUNDLED).close()
    res = {}
    with _server_beside(s):
        n = 2000 if quick else 20000
        with PoolClient(s, BUNDLED) as c:
            shm = _latencies(c.ping, n)
            tcp_client = PoolClient(s.model_copy(update={"transport": "tcp"}), BUNDLED)
            tcp = _latencies(tcp_client.ping, n // 4)
            # Both with session tokens and every check; TCP is the authenticated transport (pool token).
            res.update(rpc_shm_p50_us=float(np.percentile(shm, 50)), rpc_shm_p99_us=float(np.percentile(shm, 99)),
                       rpc_tcp_p50_us=float(np.percentile(tcp, 50)), rpc_tcp_p99_us=float(np.percentile(tcp, 99)))
            hello = _latencies(lambda: tcp_client.rpc.hello(), 50)  # connect, challenge, HMAC proof, session
            res["tcp_authenticated_connect_p50_us"] = float(np.percentile(hello, 50))
            tcp_client.close()
            res["rpc_shm_speedup_vs_tcp"] = res["rpc_tcp_p50_us"] / res["rpc_shm_p50_us"]

            # Block data path: 32 blocks of 5.9 MB (190 MB), beyond the caches.
            nb = 8 if quick else 32
            src = np.random.default_rng(0).integers(0, 255, (nb, BUNDLED.block_bytes), dtype=np.uint8)
            slots = c.alloc([f"bench{i}".encode().ljust(32, b"\0") for i in range(nb)])
            offs = [c.slot_offset(sl) for sl, _ in slots]
            dst = np.empty_like(src)
            total = src.nbytes
            for mode in ("coherent", "native"):
                coh = make_coherence(mode, c.mem)
                sfx = "" if mode == "coherent" else "_native"
                res[f"write_GBps{sfx}"] = _gbps(total, lambda coh=coh: [
                    coh.write_block(o, native.address(src[i]), BUNDLED.block_bytes) for i, o in enumerate(offs)])
                res[f"read_GBps{sfx}"] = _gbps(total, lambda coh=coh: [
                    coh.read_block(o, native.address(dst[i]), BUNDLED.block_bytes) for i, o in enumerate(offs)])
            views = [c.mem[o:o + BUNDLED.block_bytes] for o in offs]
            res["memcpy_GBps"] = _gbps(total, lambda: [np.copyto(v, src[i]) for i, v in enumerate(views)])
            res["write_vs_memcpy"] = res["write_GBps"] / res["memcpy_GBps"]
            res["read_vs_memcpy"] = res["read_GBps"] / res["memcpy_GBps"]
            c.abort([(sl, g) for sl, g in slots])
    return res


def index(quick: bool) -> dict:
    n_blocks = 100_000 if quick else 1_000_000
    s = _settings((n_blocks + 4096) * (4096 + 64) + (64 << 20), high_watermark=1.0, low_watermark=1.0)
    pool_mod.create(s, TINY).close()
    res = {}
    with _server_beside(s):
        with PoolClient(s, TINY) as c:
            keys = [i.to_bytes(8, "little").ljust(32, b"k") for i in range(n_blocks)]
            for i in range(0, n_blocks, 2048):  # fill the index (no data needed for lookups)
                got = c.alloc(keys[i:i + 2048])
                c.commit([(sl, g, 0, k) for (sl, g), k in zip(got, keys[i:i + 2048], strict=True) if sl >= 0])
            res["index_blocks"] = c.stats()["committed_blocks"]
            rng = np.random.default_rng(1)
            picks = [keys[j] for j in rng.integers(0, n_blocks, 2000)]
            lat = np.array([_timed(lambda k=k: c.lookup([k], lease=False)) for k in picks]) * 1e6
            res["index_1m_lookup_us"] = float(np.percentile(lat, 50))
            res["index_1m_lookup_p99_us"] = float(np.percentile(lat, 99))
            chain = keys[:1000]
            lat = np.array([_timed(lambda: c.lookup(chain, lease=False)) for _ in range(50)]) * 1e3
            res["lookup_1000_ms"] = float(np.percentile(lat, 50))
    return res


def coherence_rows() -> dict:
    """The CPU rows of the Beluga paper's Table 4, for 16 KB, in microseconds (median of many)."""
    n = 16 * 1024
    buf = np.zeros(4 * n, np.uint8)
    src, dst = native.address(buf), native.address(buf) + 2 * n

    def store_clflush():
        cpu.copy_checksum(dst, src, n, 0)
        native.flush_range(dst, n)

    def ntstore():
        cpu.copy_nt_checksum(dst, src, n, 0)
        native.store_fence()

    def clflush_read():
        native.invalidate_range(dst, n)
        cpu.checksum(dst, n)

    def plain_read():
        cpu.checksum(dst, n)

    rows = {}
    for name, fn in (("coh_store_clflush_write_us", store_clflush), ("coh_ntstore_write_us", ntstore),
                     ("coh_clflush_read_us", clflush_read), ("coh_plain_read_us", plain_read)):
        fn()
        rows[name] = float(np.median(_latencies(fn, 2000)))
    return rows


def run(quick: bool = False) -> dict:
    out = {"machine": f"{os.cpu_count()} cores"}
    out.update(rpc_and_data(quick))
    out.update(index(quick))
    out.update(coherence_rows())
    out["targets_met"] = {
        "rpc_shm_p50_le_5us": out["rpc_shm_p50_us"] <= 5,
        "rpc_shm_5x_tcp": out["rpc_shm_speedup_vs_tcp"] >= 5,
        "write_ge_70pct_memcpy": out["write_vs_memcpy"] >= 0.7,
        "read_ge_70pct_memcpy": out["read_vs_memcpy"] >= 0.7,
        "lookup_1000_lt_1ms": out["lookup_1000_ms"] < 1,
        "index_1m_lookup_lt_10us": out["index_1m_lookup_us"] < 10,
    }
    return out
