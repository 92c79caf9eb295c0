"""bench/chaos.py: faults under load, every answer checked against a reference.

    python bench/chaos.py [--schedule full|short] [--concurrency 2] [--docs 8] [--out DIR]

Starts the pool (its metadata server supervised, as `beluga serve` runs it), two Ray-managed vLLM CPU
workers with the connector, and the router as a process of its own (so that it can be restarted), on
127.0.0.1. A closed loop replays synthetic LV-Eval-format documents through the router while a fault
schedule runs: worker killed (Ray's actor brings its engine back), worker stopped for 10 s (a hang:
ejected, then back), metadata server killed (supervised) and stopped for 2 s, an engine killed while it
saves, random bytes of committed blocks corrupted, the pool filled to its limit, the router restarted.

The reference for each document is the same prompt, greedy, computed with a fresh random `cache_salt`:
no block of it can come from the pool or the engine's own cache. Every answer under load is compared
with it; a different answer is a wrong output (the number that must be 0).

Report (JSON, and a table on stdout): requests sent / succeeded / failed, and for each failure whether a
fault was active when it was in flight; wrong outputs; per fault, the time to recover (the first request
served by the part that came back) and the pool hit rate in the windows before and after; committed
blocks before and after the server kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from beluga import model
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.bench import free_port
from beluga.cxlpool.client import PoolClient
from beluga.cxlpool.layout import COMMITTED, HEADER_BYTES, SLOT_HEADER
from beluga.cxlpool.settings import PoolSettings
from beluga.loadgen import dataset, synth
from beluga.loadgen.client import stream_request
from beluga.serve import ServeSettings, Stack

log = logging.getLogger("bench.chaos")
MODEL = "smollm2-135m-instruct"
WINDOW_S = 20.0  # hit rate before / after a fault


@dataclass
class Done:
    """One request under load."""

    t0: float
    t1: float
    doc: int
    ok: bool
    error: str
    worker: str
    prompt_tokens: int
    cached_tokens: int
    wrong: bool


@dataclass
class FaultRecord:
    name: str
    start: float
    end: float  # when the fault stopped acting (SIGCONT, restart issued): recovery counts from here
    part: str = ""  # the worker URL or component that must come back
    recovered_s: float | None = None
    notes: dict = field(default_factory=dict)


class Chaos:
    def __init__(self, out: Path, concurrency: int, docs: int):
        self.out, self.concurrency = out, concurrency
        self.pool = f"/dev/shm/beluga-chaos-{uuid.uuid4().hex[:8]}"
        self.admin, self.tcp, self.port = free_port(), free_port(), free_port()
        base = free_port()
        self.ss = ServeSettings(workers=2, pool=self.pool, pool_size=1 << 30, pool_admin_port=self.admin,
                                pool_tcp_port=self.tcp, worker_base_port=base, log_dir=str(out / "logs"),
                                kv_space_gb=1, max_model_len=4096)
        self.workers = [f"http://127.0.0.1:{base + i}" for i in range(2)]
        rows = synth.make_rows("multifieldqa_en_mixup", docs, "16k", seed=7, words=450)
        self.prompts = [dataset.build_prompt(dataset.Row(subset="multifieldqa_en_mixup", index=i, **r))
                        for i, r in enumerate(rows)]
        self.reference: list[str] = []
        self.done: list[Done] = []
        self.faults: list[FaultRecord] = []
        self.stack: Stack | None = None
        self.router: subprocess.Popen | None = None
        self.stop = asyncio.Event()

    # -- the stack ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.stack = Stack(self.ss)
        self.stack.start(lambda msg: log.info(msg))
        self.start_router()

    def start_router(self) -> None:
        cmd = [sys.executable, "-m", "beluga", "router", "--port", str(self.port)]
        for w in self.workers:
            cmd += ["--worker", w]
        self.router = subprocess.Popen(cmd, stdout=open(self.out / "logs" / "router.log", "ab"),
                                       stderr=subprocess.STDOUT)
        _wait(lambda: httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200, 60)

    def close(self) -> None:
        if self.router:
            self.router.kill()
        if self.stack:
            self.stack.stop()
        for p in (self.pool, self.pool + ".bell", self.pool + ".token"):
            if os.path.exists(p):
                os.unlink(p)

    def stats(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.admin}/stats", timeout=5).json()

    def engine_pid(self, url: str) -> int:
        port = int(url.rsplit(":", 1)[1])
        return next(c.pid for c in psutil.net_connections("tcp")
                    if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN)

    def server_proc(self) -> psutil.Process:
        return psutil.Process(self.stack.pool_proc.pid)

    # -- load ----------------------------------------------------------------------------------------------
    async def references(self) -> None:
        async with httpx.AsyncClient(timeout=300) as c:
            for i, p in enumerate(self.prompts):
                r = await stream_request(c, f"http://127.0.0.1:{self.port}", MODEL, p, 8, f"ref{i}", 0,
                                         extra={"cache_salt": uuid.uuid4().hex})
                if not r.ok:
                    raise RuntimeError(f"reference {i} failed: {r.error}")
                self.reference.append(r.text)
        log.info("references computed for %d documents", len(self.prompts))

    async def load(self) -> None:
        rng = random.Random(0)

        async def loop(k: int) -> None:
            async with httpx.AsyncClient(timeout=120) as c:
                n = 0
                while not self.stop.is_set():
                    doc = rng.randrange(len(self.prompts))
                    t0 = time.monotonic()
                    r = await stream_request(c, f"http://127.0.0.1:{self.port}", MODEL, self.prompts[doc], 8,
                                             f"l{k}-{n}", 1)
                    wrong = r.ok and r.text != self.reference[doc]
                    if wrong:
                        log.error("WRONG output for document %d from %s: %r != %r", doc, r.worker, r.text,
                                  self.reference[doc])
                    self.done.append(Done(t0, time.monotonic(), doc, r.ok, r.error[:200], r.worker, r.prompt_tokens,
                                          r.cached_tokens, wrong))
                    n += 1
                    if not r.ok:
                        await asyncio.sleep(0.5)  # a refused request (no worker, router down): do not spin

        await asyncio.gather(*(loop(k) for k in range(self.concurrency)))

    # -- faults -------------------------------------------------------------------------------------------
    async def first_success(self, rec: FaultRecord, timeout_s: float = 300,
                            served_by: str | None = None, hit: bool = False) -> None:
        """Recovery: the first request that started after the fault ended, succeeded and (if asked) was
        served by the part that came back, or hit the pool."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for d in self.done:
                if d.t0 >= rec.end and d.ok and (served_by is None or d.worker == served_by) and \
                        (not hit or d.cached_tokens > 0):
                    rec.recovered_s = d.t1 - rec.end
                    return
            await asyncio.sleep(0.2)

    async def kill_worker(self, rec: FaultRecord) -> None:
        rec.part = self.workers[0]
        os.kill(self.engine_pid(rec.part), signal.SIGKILL)
        rec.end = time.monotonic()
        await self.first_success(rec, served_by=rec.part)

    async def stop_worker(self, rec: FaultRecord) -> None:
        rec.part = self.workers[1]
        pids = _group(self.engine_pid(rec.part))
        for p in pids:
            p.suspend()
        ejected = None
        t = time.monotonic()
        while time.monotonic() - t < 10:
            view = httpx.get(f"http://127.0.0.1:{self.port}/workers", timeout=5).json()
            if ejected is None and not next(w["healthy"] for w in view if w["url"] == rec.part):
                ejected = time.monotonic() - rec.start
            await asyncio.sleep(0.5)
        for p in pids:
            p.resume()
        rec.end = time.monotonic()
        rec.notes["ejected_after_s"] = ejected
        await self.first_success(rec, served_by=rec.part)

    async def kill_server(self, rec: FaultRecord) -> None:
        before = self.stats()["committed_blocks"]
        old = self.server_proc()
        old.kill()
        rec.end = time.monotonic()
        _wait(lambda: self.stack.pool_proc.pid != old.pid and httpx.get(
            f"http://127.0.0.1:{self.admin}/health", timeout=0.5).status_code == 200, 30, pause=0.02)
        rec.notes.update(committed_before=before, committed_after=self.stats()["committed_blocks"],
                         server_back_s=time.monotonic() - rec.end)
        rec.part = "metadata server"
        await self.first_success(rec, hit=True)

    async def stop_server(self, rec: FaultRecord) -> None:
        p = self.server_proc()
        p.suspend()
        await asyncio.sleep(2)
        p.resume()
        rec.end = time.monotonic()
        rec.part = "metadata server"
        await self.first_success(rec, hit=True)

    async def kill_engine_while_saving(self, rec: FaultRecord) -> None:
        """A fresh long prompt straight to one worker; its engine dies about when the prefill ends and the
        save begins."""
        rec.part = self.workers[0]
        fresh = self.prompts[0] + " Also: " + uuid.uuid4().hex * 40
        async with httpx.AsyncClient(timeout=120) as c:
            task = asyncio.create_task(c.post(rec.part + "/v1/completions", json={
                "model": MODEL, "prompt": fresh, "max_tokens": 1, "temperature": 0}))
            await asyncio.sleep(2.0)
            os.kill(self.engine_pid(rec.part), signal.SIGKILL)
            rec.end = time.monotonic()
            try:
                await task
            except httpx.HTTPError:
                pass
        await self.first_success(rec, served_by=rec.part)
        rec.notes["writing_slots_after"] = self.stats()["writing_slots"]

    async def corrupt_blocks(self, rec: FaultRecord) -> None:
        p = pool_mod.attach(PoolSettings(path=[self.pool]), data=False)
        hdr = np.ndarray(p.geo.n_slots, SLOT_HEADER, buffer=p.mem, offset=p.geo.hdr_off, strides=(HEADER_BYTES,))
        committed = np.nonzero(hdr["state"] == COMMITTED)[0]
        rng = np.random.default_rng(1)
        victims = rng.choice(committed, size=min(20, committed.size), replace=False)
        for s in victims.tolist():
            off = p.geo.data_off + s * p.geo.slot_bytes + int(rng.integers(0, p.fmt.block_bytes))
            p.mem[off] ^= 0xFF
        p.close()
        rec.end = time.monotonic()
        rec.notes["blocks_corrupted"] = int(victims.size)
        before = self.stats()["integrity_failures"]
        await asyncio.sleep(WINDOW_S)
        rec.notes["integrity_failures_seen"] = self.stats()["integrity_failures"] - before
        rec.recovered_s = 0.0  # nothing went away: what matters is that no wrong output followed

    async def fill_pool(self, rec: FaultRecord) -> None:
        s = PoolSettings(path=[self.pool], transport="shm")
        with PoolClient(s) as c:
            n, nb = c.geo.n_slots, c.fmt.block_bytes
            junk = np.zeros(nb, np.uint8)
            before = self.stats()["evictions"]
            i = 0
            while self.stats()["evictions"] - before < n // 2 and i < 4 * n:
                ks = [uuid.uuid4().bytes * 2 for _ in range(16)]
                c.put(ks, [junk] * 16)
                i += 16
                await asyncio.sleep(0)
            rec.notes.update(evictions=self.stats()["evictions"] - before, filler_blocks=i)
        rec.end = time.monotonic()
        await self.first_success(rec, hit=True)

    async def restart_router(self, rec: FaultRecord) -> None:
        self.router.kill()
        self.router.wait()
        await asyncio.sleep(1)
        self.start_router()
        rec.end = time.monotonic()
        rec.part = "router"
        await self.first_success(rec)

    SCHEDULES = {
        "full": ["kill_worker", "stop_worker", "kill_server", "stop_server", "kill_engine_while_saving",
                 "corrupt_blocks", "fill_pool", "restart_router"],
        "short": ["kill_server", "stop_server", "corrupt_blocks", "fill_pool", "stop_worker", "restart_router"],
    }

    async def run(self, schedule: str, gap_s: float) -> dict:
        await self.references()
        load = asyncio.create_task(self.load())
        await asyncio.sleep(gap_s)
        for name in self.SCHEDULES[schedule]:
            rec = FaultRecord(name, time.monotonic(), time.monotonic())
            log.info("fault: %s", name)
            await getattr(self, name)(rec)
            self.faults.append(rec)
            log.info("  %s", asdict(rec))
            await asyncio.sleep(gap_s)
        self.stop.set()
        await load
        return self.report()

    # -- report ---------------------------------------------------------------------------------------------
    def report(self) -> dict:
        done = self.done
        failed = [d for d in done if not d.ok]

        def during_fault(d: Done) -> bool:
            return any(d.t0 <= f.end + 1 and d.t1 >= f.start for f in self.faults)

        def hit_rate(t0: float, t1: float) -> float | None:
            ds = [d for d in done if d.ok and t0 <= d.t0 < t1]
            p = sum(d.prompt_tokens for d in ds)
            return round(sum(d.cached_tokens for d in ds) / p, 3) if p else None

        faults = []
        for f in self.faults:
            back = f.end + (f.recovered_s or 0)
            faults.append(asdict(f) | {"start": None, "end": None,
                                       "hit_rate_before": hit_rate(f.start - WINDOW_S, f.start),
                                       "hit_rate_after": hit_rate(back, back + WINDOW_S)})
        return {
            "requests": len(done), "succeeded": len(done) - len(failed), "failed": len(failed),
            "failed_while_a_fault_was_active": sum(during_fault(d) for d in failed),
            "failed_otherwise": [asdict(d) for d in failed if not during_fault(d)],
            "wrong_outputs": sum(d.wrong for d in done),
            "documents": len(self.prompts), "concurrency": self.concurrency,
            "duration_s": round(max(d.t1 for d in done) - min(d.t0 for d in done), 1) if done else 0,
            "faults": faults,
        }


def _group(pid: int) -> list[psutil.Process]:
    """The engine's API server and every process of its group (its engine core)."""
    pgid = os.getpgid(pid)
    return [p for p in psutil.process_iter() if _pgid(p.pid) == pgid]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _wait(ok, timeout_s: float, pause: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except (httpx.HTTPError, psutil.Error, StopIteration):
            pass
        time.sleep(pause)
    raise TimeoutError("condition not met in time")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", choices=sorted(Chaos.SCHEDULES), default="full")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--gap-s", type=float, default=20.0, help="load between faults")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model.path_or_raise()
    out = Path(a.out or tempfile.mkdtemp(prefix="beluga-chaos-"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    chaos = Chaos(out, a.concurrency, a.docs)
    try:
        chaos.start()
        result = asyncio.run(chaos.run(a.schedule, a.gap_s))
    finally:
        chaos.close()
    result |= {"schedule": a.schedule, "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
