"""vLLM workers as Ray actors: each actor owns one `vllm serve` process and keeps it alive.

An actor restarts its engine when the process dies or stops answering `/health`, and Ray restarts the
actor itself if it dies. Actors are named `beluga-worker-<i>` in the `beluga` namespace: that is the
registry the router reads (`registered_urls`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray

from beluga.workers.engine import EngineProcess, EngineSettings, tail

log = logging.getLogger(__name__)

NAMESPACE = "beluga"
PREFIX = "beluga-worker-"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)
class WorkerActor:
    def __init__(self, settings: dict, unhealthy_after_s: float = 30.0, check_every_s: float = 1.0):
        self.settings = EngineSettings(**settings)
        self.unhealthy_after_s, self.check_every_s = unhealthy_after_s, check_every_s
        self.engine = EngineProcess(self.settings).start()
        self.restarts = 0
        self.start_failures = 0  # in a row, before the engine ever answered: bad settings, not bad luck
        self.last_error = ""
        self.ready = False
        self.stopping = False
        self._lock = threading.Lock()
        threading.Thread(target=self._supervise, daemon=True).start()

    def _supervise(self) -> None:
        bad_since = None
        while not self.stopping:
            if not self.ready:
                try:
                    self.engine.wait_ready()
                    self.ready = True
                    self.start_failures = 0
                    bad_since = None
                except (RuntimeError, TimeoutError) as e:
                    log.warning("worker %s failed to start: %s", self.settings.url, e)
                    self.start_failures += 1
                    self.last_error = f"{e}\n{tail(self.settings.log_file, 12)}"
                    self._restart()
                continue
            if not self.engine.alive():
                log.warning("worker %s died (exit %s); restarting", self.settings.url, self.engine.proc.returncode)
                self._restart()
                continue
            if self.engine.healthy():
                bad_since = None
            else:
                bad_since = bad_since or time.monotonic()
                if time.monotonic() - bad_since > self.unhealthy_after_s:
                    log.warning("worker %s unhealthy for %.0fs; restarting", self.settings.url,
                                self.unhealthy_after_s)
                    self._restart()
                    bad_since = None
            time.sleep(self.check_every_s)

    def _restart(self) -> None:
        with self._lock:
            if self.stopping:
                return
            self.ready = False
            self.engine.stop(grace_s=5)
            self.restarts += 1
            self.engine = EngineProcess(self.settings).start()

    def info(self) -> dict:
        return {"url": self.settings.url, "ready": self.ready, "pid": self.engine.pid, "restarts": self.restarts,
                "start_failures": self.start_failures, "last_error": self.last_error}

    def stop(self) -> None:
        self.stopping = True
        with self._lock:
            self.engine.stop()


def registered_urls(address: str | None = None) -> list[str]:
    """URLs of every Beluga worker actor in the cluster (the router's Ray discovery)."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX)]
    urls = []
    for n in sorted(names):
        try:
            urls.append(ray.get(ray.get_actor(n, namespace=NAMESPACE).info.remote(), timeout=5)["url"])
        except (ray.exceptions.RayError, ValueError):
            continue  # restarting actor: it is back on the next refresh
    return urls


class Fleet:
    """Start, watch and stop N worker actors."""

    def __init__(self, settings: list[EngineSettings], ray_address: str | None = None, num_cpus: int | None = None):
        self.settings = settings
        if not ray.is_initialized():
            if ray_address:
                ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
        self.actors = []

    def start(self, progress: Callable[[str], None] | None = None, timeout_s: float = 600,
              give_up_after: int = 2) -> Fleet:
        """Start every worker and wait until all answer. A worker whose engine exits `give_up_after` times
        in a row while starting has bad settings (a vLLM flag, the model, the pool): fail now, with its log."""
        for i, s in enumerate(self.settings):
            self.actors.append(WorkerActor.options(name=f"{PREFIX}{i}", namespace=NAMESPACE,
                                                   lifetime=None).remote(s.model_dump()))
        deadline = time.monotonic() + timeout_s
        while True:
            infos = self.infos()
            ready = sum(i["ready"] for i in infos)
            if progress:
                progress(f"{ready}/{len(infos)} workers ready")
            if ready == len(infos):
                return self
            broken = next((i for i in infos if not i["ready"] and i["start_failures"] >= give_up_after), None)
            if broken:
                raise RuntimeError(f"worker {broken['url']} failed to start {broken['start_failures']} times: "
                                   f"{broken['last_error']}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {ready} of {len(infos)} workers became ready in {timeout_s}s")
            time.sleep(1)

    def infos(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors], timeout=30)

    def stop(self) -> None:
        try:
            ray.get([a.stop.remote() for a in self.actors], timeout=60)
        except ray.exceptions.RayError as e:
            log.warning("stopping workers: %s", e)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
