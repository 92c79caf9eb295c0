"""Running the metadata server process: shared-memory endpoint, TCP endpoint, admin HTTP endpoint."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from beluga.cxlpool import coherence
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.layout import KVFormat
from beluga.cxlpool.rpc import doorbell_path
from beluga.cxlpool.server import Dispatcher, PoolIndex, ShmEndpoint, TcpEndpoint
from beluga.cxlpool.settings import PoolSettings

log = logging.getLogger(__name__)


class MetadataService:
    """Everything `beluga pool serve` runs, startable in a thread for tests."""

    def __init__(self, settings: PoolSettings, create_format: KVFormat | None = None):
        self.settings = settings
        # The server reads and writes metadata only: it leaves the data area unmapped until touched.
        self.pool = (pool_mod.open_or_create(settings, create_format, data=False) if create_format
                     else pool_mod.attach(settings, data=False))
        self.coh = coherence.make(settings.coherence, self.pool.mem, settings.test_drop)
        self.index = PoolIndex(self.pool.mem, self.pool.geo, self.coh, settings.eviction,
                               settings.high_watermark, settings.low_watermark)
        self.dispatch = Dispatcher(self.index, self.pool.fmt.block_bytes)
        self.shm = ShmEndpoint(self.pool.mem, self.pool.geo, self.dispatch,
                               doorbell_path(settings.path[0]), settings.spin_us)
        self.shm.status["pid"] = os.getpid()
        self.shm.status["epoch"] = int(self.shm.status["epoch"][0]) + 1
        self.tcp = TcpEndpoint(settings.tcp_host, settings.tcp_port, self.dispatch)
        self.admin = ThreadingHTTPServer((settings.admin_host, settings.admin_port), _admin_handler(self))
        self.admin.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def tcp_port(self) -> int:
        return self.tcp.server_address[1]

    @property
    def admin_port(self) -> int:
        return self.admin.server_address[1]

    def stats(self) -> dict:
        with self.dispatch.lock:
            return self.index.snapshot() | {"format": self.pool.fmt.describe(), "path": self.settings.path}

    def start_background(self) -> None:
        for target in (self.tcp.serve_forever, self.admin.serve_forever):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)

    def serve_forever(self) -> None:
        self.start_background()
        log.info("metadata server up: pool %s, %d slots, tcp %s:%d, admin http://%s:%d", self.settings.path,
                 self.pool.geo.n_slots, self.settings.tcp_host, self.tcp_port, self.settings.admin_host,
                 self.admin_port)
        self.shm.serve_forever()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shm.close()
        self.tcp.shutdown()
        self.tcp.server_close()
        self.admin.shutdown()
        self.admin.server_close()


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
    signal.signal(signal.SIGTERM, lambda *_: svc.shm.stop.set())
    try:
        svc.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
