"""Running the metadata server process: the one-server-per-pool guard, the shared-memory endpoint, the
authenticated TCP endpoint, the admin HTTP endpoint (read-only: health, stats, metrics)."""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import secrets
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from beluga.cxlpool import coherence
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.errors import PoolRefused
from beluga.cxlpool.layout import KVFormat, server_status
from beluga.cxlpool.protocol import doorbell_path
from beluga.cxlpool.server.dispatch import Dispatcher
from beluga.cxlpool.server.index import PoolIndex
from beluga.cxlpool.server.shm import BEAT_EVERY_S, ShmEndpoint
from beluga.cxlpool.server.tcp import TcpEndpoint
from beluga.cxlpool.settings import PoolSettings

log = logging.getLogger(__name__)


class MetadataService:
    """Everything `beluga pool serve` runs, startable in a thread for tests."""

    def __init__(self, settings: PoolSettings, create_format: KVFormat | None = None):
        self.settings = settings
        # The server reads and writes metadata only: it leaves the data area unmapped until touched.
        self.pool = (pool_mod.open_or_create(settings, create_format, data=False) if create_format
                     else pool_mod.attach(settings, data=False))
        svc = self.pool.svc
        self._lock_fd = claim_pool(settings.path[0], self.pool.mem)  # before anything is written
        pool_token = pool_mod.read_token(settings.token_path()) if "tcp" in svc.transports else None
        self.coh = coherence.make(svc.coherence, self.pool.mem, settings.test_drop)
        self.index = PoolIndex(self.pool.mem, self.pool.geo, self.coh, settings.eviction,
                               settings.high_watermark, settings.low_watermark, settings.client_quota)
        self.dispatch = Dispatcher(self.index, self.pool.fmt.block_bytes, secrets.randbits(63))
        self.shm = (ShmEndpoint(self.pool.mem, self.pool.geo, self.dispatch, doorbell_path(settings.path[0]),
                                settings.spin_us, settings.heartbeat_timeout_s) if "shm" in svc.transports else None)
        status = server_status(self.pool.mem)
        status["pid"] = os.getpid()
        status["epoch"] = int(status["epoch"][0]) + 1
        self.stop = threading.Event()
        self.tcp = (TcpEndpoint(settings.tcp_host, settings.tcp_port, self.dispatch, pool_token,
                                settings.heartbeat_timeout_s, 2 * self.pool.geo.n_clients)
                    if pool_token is not None else None)
        self.admin = ThreadingHTTPServer((settings.admin_host, settings.admin_port), _admin_handler(self))
        self.admin.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def tcp_port(self) -> int | None:
        return self.tcp.server_address[1] if self.tcp else None

    @property
    def admin_port(self) -> int:
        return self.admin.server_address[1]

    def stats(self) -> dict:
        with self.dispatch.locked():
            return self.dispatch.snapshot() | {"format": self.pool.fmt.describe(), "path": self.settings.path,
                                               "coherence": self.pool.svc.coherence,
                                               "transports": list(self.pool.svc.transports)}

    def start_background(self) -> None:
        targets = [self.admin.serve_forever, self._housekeeping]
        if self.tcp:
            targets.append(self.tcp.serve_forever)
        for target in targets:
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)

    def _housekeeping(self) -> None:
        """Reclaim slots left "writing" past the write timeout, whoever holds them; beat for the pool's
        guard when no shared-memory loop does."""
        status = server_status(self.pool.mem)
        while not self.stop.wait(BEAT_EVERY_S):
            if self.shm is None:
                status["beat"] += 1
                status["heartbeat_ns"] = time.time_ns()
            with self.dispatch.locked():
                self.index.drain()
                n = self.index.expire_writes(time.monotonic() - self.settings.write_timeout_s)
            if n:
                log.warning("reclaimed %d slot(s) allocated more than %.0fs ago and never committed", n,
                            self.settings.write_timeout_s)

    def serve_forever(self) -> None:
        self.start_background()
        log.info("metadata server up: pool %s, %d slots, %s, serving %s, tcp %s:%s, admin http://%s:%d",
                 self.settings.path, self.pool.geo.n_slots, self.pool.svc.coherence,
                 "+".join(self.pool.svc.transports), self.settings.tcp_host, self.tcp_port,
                 self.settings.admin_host, self.admin_port)
        if self.shm:
            self.shm.serve_forever()
        else:
            self.stop.wait()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, daemon=True)
        t.start()
        return t

    def request_stop(self) -> None:
        self.stop.set()
        if self.shm:
            self.shm.stop.set()

    def close(self) -> None:
        self.request_stop()
        if self.shm:
            self.shm.close()
        if self.tcp:
            self.tcp.shutdown()
            self.tcp.server_close()
        self.admin.shutdown()
        self.admin.server_close()
        server_status(self.pool.mem)["pid"] = 0  # a clean stop: the next server need not wait for our beat
        os.close(self._lock_fd)


def claim_pool(path: str, mem: np.ndarray) -> int:
    """Be the pool's only metadata server, or refuse. On one kernel (hosts in namespaces, or one machine) a
    file lock says it at once; across hosts that share only the memory, a server that still beats does:
    a server that left its pid in the status page is watched for a few beats first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PoolRefused(f"another metadata server holds {path}; one pool has one server "
                          "(stop the other first)") from None
    status = server_status(mem)
    if int(status["pid"][0]):
        beat = int(status["beat"][0])
        time.sleep(3.5 * BEAT_EVERY_S)
        if int(status["beat"][0]) != beat:
            os.close(fd)
            raise PoolRefused(f"another metadata server (pid {int(status['pid'][0])}, on another host) is "
                              f"beating in {path}; one pool has one server")
    return fd


def _admin_handler(svc: MetadataService):
    registry = CollectorRegistry()
    gauges = {
        k: Gauge(f"beluga_pool_{k}", doc, registry=registry)
        for k, doc in {
            "slots": "slots in the pool", "used_slots": "slots in use", "committed_blocks": "indexed blocks",
            "leased_slots": "slots pinned by readers", "lookups": "lookup calls",
            "lookup_blocks": "blocks asked for", "hit_blocks": "blocks found", "commits": "blocks committed",
            "evictions": "blocks evicted", "integrity_failures": "blocks dropped on checksum mismatch",
            "reclaimed_slots": "slots reclaimed from dead writers",
            "expired_writes": "slots reclaimed from writers past the write timeout",
            "sessions": "client sessions open",
        }.items()
    }

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, b'{"status":"ok"}', "application/json")
            elif self.path == "/stats":
                self._send(200, json.dumps(svc.stats()).encode(), "application/json")
            elif self.path == "/metrics":
                snap = svc.stats()
                for k, g in gauges.items():
                    g.set(snap[k])
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
            else:
                self._send(404, b'{"error":"not found: try /health, /stats, /metrics"}', "application/json")

        def log_message(self, fmt, *args):
            log.debug("admin: " + fmt, *args)

    return Handler


def run(settings: PoolSettings, create_format: KVFormat | None = None) -> None:
    svc = MetadataService(settings, create_format)
    # The eviction policy and lease tables hold an object or more per slot, millions of them, that live as
    # long as the server: keep the collector from walking them (its full passes show up as latency spikes).
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    signal.signal(signal.SIGTERM, lambda *_: svc.request_stop())
    try:
        svc.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
