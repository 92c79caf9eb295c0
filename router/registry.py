"""The workers the router knows, their health and load.

Discovery sources give URLs; the registry health-checks each one (`GET /health`), ejects a worker that
fails and readmits it when it answers again, and remembers which models each serves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger(__name__)


@dataclass
class Worker:
    url: str
    healthy: bool = False
    in_flight: int = 0
    in_flight_tokens: int = 0
    failures: int = 0
    models: set[str] = field(default_factory=set)

    def view(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "in_flight": self.in_flight,
                "in_flight_tokens": self.in_flight_tokens, "models": sorted(self.models)}


Source = Callable[[], Awaitable[list[str]]]


def static_source(urls: list[str]) -> Source:
    urls = [u.rstrip("/") for u in urls]

    async def get() -> list[str]:
        return urls

    return get


def dns_source(name: str, port: int) -> Source:
    """Kubernetes headless service: every A record is a worker pod. A failed lookup raises (socket.gaierror):
    the registry then keeps the workers it has, instead of taking the failure for "no workers"."""

    async def get() -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        return sorted({f"http://{i[4][0]}:{port}" for i in infos})

    return get


def ray_source(address: str | None) -> Source:
    """The workers registered by `beluga.workers.fleet` in the Ray cluster."""

    async def get() -> list[str]:
        from beluga.workers.fleet import registered_urls  # imported lazily: Ray is optional here

        return await asyncio.to_thread(registered_urls, address)

    return get


class Registry:
    def __init__(self, source: Source, client: aiohttp.ClientSession, interval_s: float = 2.0):
        self.source, self.client, self.interval_s = source, client, interval_s
        self.workers: dict[str, Worker] = {}
        self._task: asyncio.Task | None = None

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy]

    def models(self) -> set[str]:
        return set().union(*(w.models for w in self.healthy())) if self.workers else set()

    async def refresh(self) -> None:
        """Ask discovery for the workers, then health-check each. A discovery that fails (one DNS lookup that
        times out, Ray busy) changes nothing: the last good list stays, still health-checked, so one failed
        lookup no longer empties the router until the next refresh."""
        try:
            urls = await self.source()
        except Exception as e:  # any failure of discovery is "no news", never "no workers"
            log.warning("worker discovery failed, keeping the last %d worker(s): %s: %s", len(self.workers),
                        type(e).__name__, e)
        else:
            for u in urls:
                self.workers.setdefault(u, Worker(u))
            for u in list(self.workers):
                if u not in urls and self.workers[u].in_flight == 0:
                    del self.workers[u]
        await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))

    async def _check(self, w: Worker) -> None:
        t = aiohttp.ClientTimeout(total=2.0)
        why = "unhealthy"
        try:
            async with self.client.get(w.url + "/health", timeout=t) as r:
                ok = r.status == 200
            if ok and not w.models:  # /v1 needs the worker key: a worker that refuses it gets no request
                async with self.client.get(w.url + "/v1/models", timeout=t) as m:
                    ok = m.status == 200
                    why = "refuses the router's worker key" if m.status in (401, 403) else why
                    w.models = {d["id"] for d in (await m.json(content_type=None))["data"]} if ok else set()
        except (TimeoutError, aiohttp.ClientError, ValueError, LookupError, TypeError):
            ok = False
        if ok != w.healthy:
            log.log(logging.INFO if ok or why == "unhealthy" else logging.ERROR, "worker %s is %s", w.url,
                    "healthy" if ok else f"{why}: ejected")
        if not ok:
            w.models = set()
        w.healthy = ok
        w.failures = 0 if ok else w.failures + 1

    def eject(self, w: Worker, why: str) -> None:
        if w.healthy:
            log.warning("ejecting %s: %s", w.url, why)
        w.healthy = False

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # discovery must never stop the router
                log.exception("worker refresh failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
