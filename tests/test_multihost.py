"""Three hosts on one machine (tests/hosts.py): each its own PID, mount (/dev/shm) and network namespace,
the pool file bind-mounted into all of them as the CXL device stand-in, linked by a switch inside
namespaces this test makes (no traffic anywhere else).

Host 0 runs the metadata server and the router; hosts 1 and 2 one vLLM CPU worker each, calling the server
over TCP with the pool token. The test process cannot reach the hosts' network: it asks processes inside
them (tests/pool_actor.py, small scripts) and reads their JSON lines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid

import hosts as hosts_mod
import pytest

from beluga import model
from beluga.cxlpool import pool as pool_mod
from beluga.cxlpool.settings import PoolSettings
from beluga.workers.kvformat import from_model_dir

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="the multi-host harness needs root and unshare(1) to create namespaces")]

log = logging.getLogger(__name__)
RPC_PORT, ADMIN_PORT, ROUTER_PORT, WORKER_PORT = 7701, 7700, 8000, 8100
HEARTBEAT_S = 1.0
PROMPT = ("Read the notes and answer.\n" + " ".join(
    f"note {i}: the pool on host zero keeps blocks that any host computed." for i in range(120))
          + "\nQuestion: where are the blocks kept?\nAnswer:")


class Cluster:
    def __init__(self, hosts, pool: str, token: str):
        self.hosts, self.pool, self.token = hosts, pool, token
        h0 = hosts[0]
        self.settings = PoolSettings(path=[pool], transport="tcp", tcp_host=h0.ip, tcp_port=RPC_PORT,
                                     token_file=token, heartbeat_timeout_s=HEARTBEAT_S, rpc_timeout_s=5)

    def actor(self, host, role: str, tag: str = "b", shm: bool = False, env: dict | None = None):
        s = self.settings.model_copy(update={"transport": "shm"}) if shm else self.settings
        return host.popen([sys.executable, "tests/pool_actor.py", role, s.model_dump_json(), tag],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def stats(self) -> dict:
        out = self.hosts[0].run([sys.executable, "tests/pool_actor.py", "stats", self.settings.model_dump_json()],
                                capture_output=True, timeout=60, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])

    def http(self, host, url: str, body: dict) -> dict:
        code = ("import httpx, json, sys; r = httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=300);"
                "r.raise_for_status(); print(json.dumps(r.json()))")
        out = host.run([sys.executable, "-c", code, url, json.dumps(body)], capture_output=True, timeout=330,
                       text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    def complete(self, host, base: str) -> tuple[str, int]:
        r = self.http(host, base + "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": PROMPT,
                                                      "max_tokens": 12, "temperature": 0})
        details = r["usage"].get("prompt_tokens_details") or {}
        return r["choices"][0]["text"], details.get("cached_tokens") or 0


def _wait_http(host, url: str, timeout_s: float) -> None:
    code = ("import httpx, sys, time\nd = time.monotonic() + float(sys.argv[2])\nwhile time.monotonic() < d:\n"
            "    try:\n        httpx.get(sys.argv[1], timeout=2).raise_for_status(); sys.exit(0)\n"
            "    except httpx.HTTPError: time.sleep(0.5)\nsys.exit(1)")
    assert host.run([sys.executable, "-c", code, url, str(timeout_s)], timeout=timeout_s + 30).returncode == 0, url


def _line(proc) -> dict:
    line = proc.stdout.readline()
    assert line, f"actor exited ({proc.poll()})"
    return json.loads(line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    pool, token = f"/dev/shm/beluga-mh-{uuid.uuid4().hex[:8]}", str(tmp / "pool.token")
    mdir = str(model.path_or_raise())
    pool_mod.create(PoolSettings(path=[pool], size=1 << 30, token_file=token), from_model_dir(mdir)).close()
    try:
        with hosts_mod.Hosts(n=3, pool_file=pool) as hosts:
            c = Cluster(hosts, pool, token)
            h0, h1, h2 = hosts
            server = h0.popen([sys.executable, "-m", "beluga", "pool", "serve", "--no-create", "--path", pool,
                               "--tcp-host", h0.ip, "--tcp-port", str(RPC_PORT), "--admin-port", str(ADMIN_PORT),
                               "--token-file", token, "--heartbeat-timeout-s", str(HEARTBEAT_S)],
                              stderr=open(tmp / "server.log", "w"))
            _wait_http(h0, f"http://127.0.0.1:{ADMIN_PORT}/health", 60)
            c.server, c.mdir, c.tmp = server, mdir, tmp
            yield c
    finally:
        for p in (pool, pool + ".bell"):
            if os.path.exists(p):
                os.unlink(p)


def test_equal_pids_on_two_hosts_keep_their_own_slots_and_leases(cluster):
    """Found: identity was the pid, so two hosts' processes with one pid shared an RPC slot, and a live
    client on another host lost its leases and writes within 1.6 s. Both clients here use the shared-memory
    RPC through the bind-mounted pool, as processes with the same pid."""
    _, h1, h2 = cluster.hosts
    a, b = cluster.actor(h1, "holder", "h1", shm=True), cluster.actor(h2, "holder", "h2", shm=True)
    try:
        ha, hb = _line(a), _line(b)
        assert ha["pid"] == hb["pid"]  # the first process of each host
        assert ha["rpc_slot"] != hb["rpc_slot"]
        time.sleep(3 * HEARTBEAT_S)  # past the heartbeat timeout: only heartbeats keep the sessions
        st = cluster.stats()
        assert st["leased_slots"] == 6 and st["writing_slots"] == 2 and st["clients_reaped"] == 0
        for p in (a, b):
            p.stdin.write("\n")
            p.stdin.flush()
        for p in (a, b):
            assert _line(p) == {"event": "done", "committed": 1, "good_reads": 3}
    finally:
        a.kill()
        b.kill()


def test_a_prompt_computed_on_host_1_is_served_on_host_2(cluster):
    h0, h1, h2 = cluster.hosts
    extra = json.dumps({"transport": "tcp", "tcp_host": h0.ip, "token_file": cluster.token})
    for i, h in ((1, h1), (2, h2)):
        h.popen([sys.executable, "-m", "beluga", "worker", "--pool", cluster.pool, "--model", cluster.mdir,
                 "--host", h.ip, "--port",
                 str(WORKER_PORT), "--cores", str(i - 1), "--pool-tcp-port", str(RPC_PORT), "--connector-extra",
                 extra], stdout=open(cluster.tmp / f"worker{i}.log", "w"), stderr=subprocess.STDOUT)
    h0.popen([sys.executable, "-m", "beluga", "router", "--host", h0.ip, "--port", str(ROUTER_PORT), "--worker",
              f"http://{h1.ip}:{WORKER_PORT}", "--worker", f"http://{h2.ip}:{WORKER_PORT}"],
             stdout=open(cluster.tmp / "router.log", "w"), stderr=subprocess.STDOUT)
    for h in (h1, h2):
        _wait_http(h0, f"http://{h.ip}:{WORKER_PORT}/health", 400)
    text1, cached1 = cluster.complete(h0, f"http://{h1.ip}:{WORKER_PORT}")
    text2, cached2 = cluster.complete(h0, f"http://{h2.ip}:{WORKER_PORT}")
    assert cached1 == 0 and cached2 > 500  # host 2 loaded what host 1 computed, through the pool
    assert text2 == text1
    _wait_http(h0, f"http://{h0.ip}:{ROUTER_PORT}/health", 60)
    assert cluster.complete(h0, f"http://{h0.ip}:{ROUTER_PORT}")[0] == text1


def test_host_1_dying_mid_save_leaves_host_2_serving_and_its_slots_come_back(cluster):
    """Every process of host 1 dies at once (its link cut first, so no goodbye reaches the server) while it
    writes blocks and holds a lease: host 2 keeps reading with 0 wrong bytes, and host 1's lease and
    half-written slots come back within the heartbeat timeout."""
    _, h1, h2 = cluster.hosts
    writer = cluster.actor(h1, "writer", "mh")
    reader = cluster.actor(h2, "reader", "mh", env={"ACTOR_SECONDS": "12"})
    try:
        while _line(writer)["i"] < 20:
            pass
        assert _line(reader)["wrong_bytes"] == 0
        h1.link_down()
        h1.kill_all()
        killed = time.monotonic()
        back = None
        last = {}
        while (line := reader.stdout.readline()):
            last = json.loads(line)
            if back is None and last["t"] > killed and last["writing"] == 0 and last["leased"] == 0:
                back = last["t"]
        assert last["wrong_bytes"] == 0 and last["reads"] > 20
        assert back is not None, last
        log.info("host 1's lease and slots back %.2f s after it died; host 2: %d reads, %d wrong bytes",
                 back - killed, last["reads"], last["wrong_bytes"])
        # time.monotonic is one clock for every host of this machine
        assert back - killed < HEARTBEAT_S + 1.0, back - killed
        text, _ = cluster.complete(cluster.hosts[0], f"http://{h2.ip}:{WORKER_PORT}")  # host 2 still serves
        assert text
    finally:
        reader.kill()
