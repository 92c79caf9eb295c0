"""`beluga serve`: the embedded default on one machine.

A pool file under /dev/shm and its metadata server, N Ray-managed vLLM CPU workers with the connector
(each bound to its own core), and the router on 127.0.0.1:8000. Ctrl-C stops every process it started.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import httpx
from pydantic import BaseModel, Field

from beluga.workers.kvformat import CPU_BLOCK_TOKENS

log = logging.getLogger(__name__)


class ServeSettings(BaseModel):
    workers: int = Field(2, ge=1, le=64)
    policy: str = "least-loaded"
    pool: str = "/dev/shm/beluga-pool"
    pool_size: int = Field(4 << 30, gt=0)
    no_pool: bool = False
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    worker_base_port: int = Field(8100, ge=1, le=65000)
    pool_admin_port: int = Field(7700, ge=0, le=65535)
    pool_tcp_port: int = Field(7701, ge=0, le=65535)
    kv_space_gb: int = Field(1, ge=1, description="each CPU worker's own KV cache, whole GB")
    max_model_len: int = Field(8192, gt=0)
    ray_address: str | None = None
    log_dir: str = Field("/tmp/beluga-logs", description="engine and pool-server logs")
    kv_transfer_config: dict | None = Field(None, description="another KV connector for every worker (a peer "
                                                              "to compare with); implies no Beluga pool")
    optimization_level: int = Field(0, ge=0, le=3)
    block_size: int = Field(CPU_BLOCK_TOKENS, gt=0, multiple_of=16, description="the workers' KV block size")


def _cores(n_workers: int) -> list[str | None]:
    ncpu = os.cpu_count() or 1
    if n_workers == 1:
        return [f"0-{ncpu - 1}" if ncpu > 1 else "0"]
    return [str(i % ncpu) for i in range(n_workers)]


class Stack:
    """Everything `beluga serve` starts, in order, and stops in reverse."""

    def __init__(self, s: ServeSettings):
        self.s = s
        self.pool_proc: subprocess.Popen | None = None
        self.fleet = None
        self._stopping = threading.Event()

    def start(self, status) -> None:
        from beluga import model
        from beluga.workers.connector import connector_config
        from beluga.workers.engine import EngineSettings
        from beluga.workers.fleet import Fleet

        s = self.s
        os.makedirs(s.log_dir, exist_ok=True)
        mdir = s.model or str(model.path_or_raise())
        use_pool = not s.no_pool and s.kv_transfer_config is None
        if use_pool:
            status(f"starting the pool metadata server on {s.pool}")
            self._start_pool(mdir)
        cores = _cores(s.workers)
        engines = [EngineSettings(
            model=mdir, port=s.worker_base_port + i, cores=cores[i], kv_space_gb=s.kv_space_gb,
            max_model_len=s.max_model_len, log_file=f"{s.log_dir}/worker-{i}.log",
            optimization_level=s.optimization_level, block_size=s.block_size,
            connector=connector_config(s.pool, tcp_port=s.pool_tcp_port) if use_pool else s.kv_transfer_config)
            for i in range(s.workers)]
        status("starting Ray")
        self.fleet = Fleet(engines, s.ray_address, num_cpus=os.cpu_count())
        self.fleet.start(progress=lambda msg: status(f"starting vLLM workers: {msg}"))

    def _start_pool(self, model_dir: str) -> None:
        s = self.s
        log_path = f"{self.s.log_dir}/pool-server.log"
        cmd = [sys.executable, "-m", "beluga", "pool", "serve", "--path", s.pool, "--size", str(s.pool_size),
               "--model-dir", model_dir, "--block-tokens", str(s.block_size), "--admin-port", str(s.pool_admin_port),
               "--tcp-port", str(s.pool_tcp_port)]
        self._pool_log = open(log_path, "ab")  # noqa: SIM115 - the server's output, for as long as it runs
        self.pool_proc = subprocess.Popen(cmd, stdout=self._pool_log, stderr=subprocess.STDOUT)
        self._wait_pool(log_path)
        threading.Thread(target=self._supervise_pool, args=(cmd, log_path), daemon=True,
                         name="pool-supervisor").start()

    def _supervise_pool(self, cmd: list[str], log_path: str) -> None:
        """Restart the metadata server at once if it dies: it rebuilds its index from the slot headers (no
        committed block is lost), and clients open new sessions by themselves."""
        while not self._stopping.is_set():
            code = self.pool_proc.wait()
            if self._stopping.is_set():
                return
            log.warning("pool metadata server exited (%s); restarting it", code)
            self.pool_proc = subprocess.Popen(cmd, stdout=self._pool_log, stderr=subprocess.STDOUT)
            time.sleep(0.5)  # a server that cannot start at all is retried twice a second, not in a spin

    def _wait_pool(self, log_path: str) -> None:
        s = self.s
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.pool_proc.poll() is not None:
                raise RuntimeError(f"pool server exited; see {log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{s.pool_admin_port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"pool server not up after 60 s; see {log_path}")

    def stop(self) -> None:
        self._stopping.set()
        if self.fleet is not None:
            self.fleet.stop()
            import ray

            ray.shutdown()
        if self.pool_proc is not None and self.pool_proc.poll() is None:
            self.pool_proc.terminate()
            try:
                self.pool_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.pool_proc.kill()


def run(s: ServeSettings, console) -> None:
    import uvicorn

    from beluga.router.app import create_app
    from beluga.router.limits import uvicorn_config
    from beluga.router.settings import RouterSettings

    stack = Stack(s)
    try:
        with console.status("starting") as st:
            stack.start(lambda msg: st.update(msg))
        rs = RouterSettings(host=s.host, port=s.port, policy=s.policy, discovery="ray", ray_address=s.ray_address)
        kv = (f"connector {s.kv_transfer_config['kv_connector']}" if s.kv_transfer_config
              else f"pool {'off' if s.no_pool else s.pool}")
        console.print(f"[green]ready[/green]: OpenAI API on http://{s.host}:{s.port}/v1 "
                      f"({s.workers} workers, policy {s.policy}, {kv})")
        uvicorn.Server(uvicorn_config(create_app(rs), rs)).run()
    finally:
        stack.stop()
