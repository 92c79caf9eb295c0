"""One vLLM OpenAI server process on the CPU (or a GPU): start it, wait until it answers, stop it.

The process runs in its own session so that stopping it takes its engine-core child with it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from beluga.workers.kvformat import CPU_BLOCK_TOKENS

log = logging.getLogger(__name__)

HASH_SEED = "0"  # identical block hashes in every engine process
HASH_ALGO = "sha256_cbor"


class EngineSettings(BaseModel):
    """How to run one `vllm serve`."""

    model: str = Field(description="model folder (the bundled model by default)")
    served_name: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    cores: str | None = Field(None, description="CPU cores for the engine's threads, e.g. '0' or '0-1'")
    kv_space_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE (whole GB: vLLM reads an integer)")
    max_model_len: int = Field(8192, gt=0)
    dtype: str = "float32"
    block_size: int | None = Field(None, gt=0, description="vLLM's --block-size; default: 32 on the CPU "
                                   "(kvformat.CPU_BLOCK_TOKENS), vLLM's own on GPUs")
    device: str = Field("cpu", description="cpu, or cuda for a GPU build of vLLM")
    # vLLM's -O level. On the CPU engine -O0 starts in ~35 s instead of ~90 s, and prefill of 2,500
    # tokens measured 4.7 s against 4.5 s compiled: not worth a minute per start.
    optimization_level: int = Field(0, ge=0, le=3)
    connector: dict | None = Field(None, description="kv-transfer-config, e.g. from BelugaConnector.config()")
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    log_file: str | None = None
    start_timeout_s: float = Field(300, gt=0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "beluga.workers.vllm_cli", "serve", self.model,
               "--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
               "--prefix-caching-hash-algo", HASH_ALGO, "--enable-prompt-tokens-details",
               "--disable-uvicorn-access-log", f"-O{self.optimization_level}"]
        block_size = self.block_size or (CPU_BLOCK_TOKENS if self.device == "cpu" else None)
        if block_size:
            cmd += ["--block-size", str(block_size)]
        if self.connector is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.connector)]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONHASHSEED": HASH_SEED,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_space_gb),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_TARGET_DEVICE": self.device,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        if self.cores is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cores
        env.update(self.env)
        return env


class EngineProcess:
    """A running `vllm serve`."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None

    def start(self) -> EngineProcess:
        s = self.settings
        out = open(s.log_file, "ab") if s.log_file else subprocess.DEVNULL
        log.info("starting vLLM on %s (cores %s)", s.url, s.cores or "all")
        self.proc = subprocess.Popen(s.command(), env=s.environment(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(self.settings.url + "/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, progress=None) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"vLLM on {self.settings.url} exited with {self.proc.returncode} while "
                                   f"starting; see {self.settings.log_file or 'its output'}")
            if self.healthy():
                return
            if progress:
                progress()
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM on {self.settings.url} not healthy after {self.settings.start_timeout_s}s")

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the server and everything in its process group (its engine core and workers too, which
        outlive a server that was SIGKILLed)."""
        if not self.proc:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            self.proc.poll()
            time.sleep(0.1)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.poll()

    def __enter__(self):
        self.start().wait_ready()
        return self

    def __exit__(self, *exc):
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (a killed Ray actor, Ctrl-C)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tail(path: str | None, lines: int = 30) -> str:
    if not path or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
