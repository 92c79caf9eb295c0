"""Shared fixtures: real pool files under /dev/shm, real metadata-server processes, real engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest

from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.bench import free_port
from beluga.cxlpool.layout import KVFormat
from beluga.cxlpool.settings import PoolSettings

# A small KV format: 2 layers x (K+V) x 16 tokens x 1 head x 64 dims, float32 = 16 KiB blocks.
SMALL = KVFormat(model="test-model", dtype="float32", layers=2, kv_heads=1, head_dim=64, block_tokens=16,
                 layout="test", hash_domain="test")


def keys(n: int, tag: bytes = b"k") -> list[bytes]:
    """n distinct 32-byte block keys."""
    return [(tag + i.to_bytes(4, "little")).ljust(32, b"\0") for i in range(n)]


def blocks(n: int, seed: int = 0) -> list[np.ndarray]:
    """n random blocks of the SMALL format."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, SMALL.block_bytes, dtype=np.uint8) for _ in range(n)]




@pytest.fixture
def pool_settings():
    """Settings for a fresh pool file (removed afterwards), with free ports for the server."""
    path = f"/dev/shm/beluga-test-{uuid.uuid4().hex[:8]}"
    s = PoolSettings(path=[path], size=32 << 20, tcp_port=free_port(), admin_port=free_port(), spin_us=2000)
    yield s
    for p in (path, path + ".bell", path + ".token"):
        if os.path.exists(p):
            os.unlink(p)


@pytest.fixture
def small_pool(pool_settings):
    pool_mod.create(pool_settings, SMALL).close()
    return pool_settings


class ServerProcess:
    """`beluga pool serve` in its own process, so tests can SIGKILL and restart it."""

    def __init__(self, settings: PoolSettings, extra_env: dict | None = None):
        self.settings = settings
        self.env = dict(os.environ, **(extra_env or {}))
        self.proc = None

    def start(self) -> ServerProcess:
        s = self.settings
        cmd = [sys.executable, "-m", "beluga", "pool", "serve", "--no-create", "--tcp-port", str(s.tcp_port),
               "--admin-port", str(s.admin_port), "--spin-us", str(s.spin_us), "--eviction", s.eviction,
               "--heartbeat-timeout-s", str(s.heartbeat_timeout_s)]
        if s.coherence:
            cmd += ["--coherence", s.coherence]
        for p in s.path:
            cmd += ["--path", p]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pool server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{s.admin_port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError("pool server did not come up")

    def stats(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.settings.admin_port}/stats", timeout=5).json()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server(small_pool):
    srv = ServerProcess(small_pool).start()
    yield srv
    srv.stop()
