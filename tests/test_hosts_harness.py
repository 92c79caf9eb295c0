"""The multi-host harness (tests/hosts.py) itself: each host has its own pids, /dev/shm and network,
shares the pool file, can be cut off or killed, and nothing is left behind afterwards."""

from __future__ import annotations

import gc
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import hosts as hosts_mod
import pytest
from hosts import Hosts

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="the multi-host harness needs root and unshare(1) to create namespaces"),
]

PY = [sys.executable, "-I", "-S"]  # the fastest-starting Python: these snippets use only the stdlib
NAMESPACES = ("net", "mnt", "pid", "uts", "ipc")
SWITCH_NAMESPACES = ("net", "pid")  # the switch shares the rest with this machine

# Echoes one message per connection; exits by itself after 30 s so it is bounded even if leaked.
SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
s.settimeout(30)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(c.recv(64))
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.sendall(b"ping")
        assert c.recv(64) == b"ping"
except OSError as e:
    sys.exit(f"client: {e!r}")
"""
PORT = 7000


@pytest.fixture
def pool_file():
    path = f"/dev/shm/beluga-test-{uuid.uuid4().hex[:8]}"
    with open(path, "wb") as f:
        f.truncate(mmap.PAGESIZE)
    yield path
    os.unlink(path)


def start_server(host):
    server = host.popen([*PY, "-c", SERVER, host.ip, str(PORT)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    return server


def connect(client_host, server_host, timeout_s: float) -> subprocess.CompletedProcess:
    return client_host.run([*PY, "-c", CLIENT, server_host.ip, str(PORT), str(timeout_s)],
                           capture_output=True, text=True, timeout=timeout_s + 10)


def namespace_ids(pid: int, kinds=NAMESPACES) -> set[tuple[str, int]]:
    return {(ns, os.stat(f"/proc/{pid}/ns/{ns}").st_ino) for ns in kinds}


def processes_in(namespaces: set[tuple[str, int]]) -> list[int]:
    """Every process of this machine that is in one of the given namespaces."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for ns, ino in namespaces:
            try:
                if os.stat(f"/proc/{pid}/ns/{ns}").st_ino == ino:
                    found.append(int(pid))
                    break
            except OSError:
                break
    return found


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout


def test_hosts_reuse_the_same_small_pids():
    with Hosts(n=2) as (h0, h1):
        # Each prints its pid and waits for stdin, so that both are alive at once.
        procs = [h.popen([*PY, "-c", "import os, sys; print(os.getpid(), flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for h in (h0, h1)]
        pids = [int(p.stdout.readline()) for p in procs]
        outer = [p.inner_pid for p in procs]
        for p in procs:
            p.communicate("")
        assert pids[0] == pids[1] == 2, pids  # PID 1 is each host's init
        assert outer[0] != outer[1] and None not in outer, outer
        assert h0.run(["hostname"], capture_output=True, text=True).stdout.strip().endswith("-h0")


def test_dev_shm_is_per_host_but_the_pool_file_is_shared(pool_file):
    with Hosts(n=2, pool_file=pool_file) as (h0, h1):
        assert h0.pool_path == h1.pool_path == pool_file
        h0.run(["touch", "/dev/shm/only-on-h0"], check=True)
        assert h0.run(["test", "-e", "/dev/shm/only-on-h0"]).returncode == 0
        assert h1.run(["test", "-e", "/dev/shm/only-on-h0"]).returncode != 0
        assert not os.path.exists("/dev/shm/only-on-h0")

        write = ("import mmap, sys\nwith open(sys.argv[1], 'r+b') as f:\n"
                 "    m = mmap.mmap(f.fileno(), 0); m[:13] = b'hello from h0'; m.close()")
        read = ("import mmap, sys\nwith open(sys.argv[1], 'r+b') as f:\n"
                "    m = mmap.mmap(f.fileno(), 0); print(m[:13].decode()); m.close()")
        h0.run([*PY, "-c", write, h0.pool_path], check=True, timeout=30)
        seen = h1.run([*PY, "-c", read, h1.pool_path], capture_output=True, text=True, check=True, timeout=30)
        assert seen.stdout.strip() == "hello from h0"
        with open(pool_file, "rb") as f:  # it is this machine's file, not a copy
            assert f.read(13) == b"hello from h0"
    assert os.path.exists(pool_file)  # the harness did not create it, so it does not remove it


def test_tcp_between_hosts_and_link_down():
    with Hosts(n=2) as (h0, h1):
        start_server(h0)
        ok = connect(h1, h0, timeout_s=5)
        assert ok.returncode == 0, ok.stderr

        h1.link_down()
        cut = connect(h1, h0, timeout_s=1)
        assert cut.returncode != 0 and "client:" in cut.stderr, cut.stderr
        assert connect(h0, h0, timeout_s=1).returncode == 0  # only h1 is cut off

        h1.link_up()
        deadline = time.monotonic() + 10
        while (back := connect(h1, h0, timeout_s=1)).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert back.returncode == 0, back.stderr


def test_kill_all_kills_one_host_only_and_restart_boots_it_again():
    with Hosts(n=3) as (h0, h1, h2):
        # On h1 a shell with a background child, so that kill_all must also reach a grandchild.
        victim = h1.popen(["sh", "-c", "sleep 60 & exec sleep 60"])
        deadline = time.monotonic() + 5
        while not (victim.inner_pid and hosts_mod._children(victim.inner_pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        grandchild = hosts_mod._children(victim.inner_pid)[0]
        bystanders = [h.popen(["sleep", "60"]) for h in (h0, h2)]

        h1.kill_all()
        assert victim.returncode == -signal.SIGKILL
        assert not os.path.exists(f"/proc/{grandchild}")
        assert not h1.alive
        with pytest.raises(RuntimeError, match="down"):
            h1.popen(["true"])
        assert all(p.poll() is None for p in bystanders)
        assert h2.run(["true"]).returncode == 0

        h1.restart()
        again = h1.run([*PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=30)
        assert again.stdout.strip() == "2"  # a fresh PID namespace
        start_server(h0)
        reached = connect(h1, h0, timeout_s=5)
        assert reached.returncode == 0, reached.stderr  # and a fresh veth on the switch


def test_nothing_is_left_after_exit_even_when_the_test_fails():
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    pool = f"/dev/shm/beluga-test-{uuid.uuid4().hex[:8]}"  # missing: the harness creates and removes it
    with pytest.raises(ZeroDivisionError):
        with Hosts(n=2, pool_file=pool) as hs:
            tag = hs.tag
            namespaces = set().union(*(namespace_ids(h.init_pid) for h in hs),
                                     namespace_ids(hs._switch.pid, SWITCH_NAMESPACES))
            busy = [h.popen(["sleep", "60"]) for h in hs]
            assert os.path.exists(pool)
            inside = hs[0].run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
            assert [line.split(":")[1].split("@")[0].strip() for line in inside.splitlines()] == ["lo", f"{tag}h0"]
            assert tag not in root_links()  # no interface of ours in this machine's namespace
            raise ZeroDivisionError("the test fails")
    assert all(p.returncode is not None for p in busy)
    assert processes_in(namespaces) == []  # so the namespaces, veths, bridge and mounts are gone
    assert not [pid for pid, argv in hosts_mod._marked_processes() if tag in argv]
    assert tag not in root_links()
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before
    assert not os.path.exists(pool)


def test_cleanup_when_the_hosts_are_garbage_collected():
    hs = Hosts(n=1)
    namespaces = namespace_ids(hs[0].init_pid)
    busy = hs[0].popen(["sleep", "60"])
    del hs
    gc.collect()
    assert busy.returncode == -signal.SIGKILL
    assert processes_in(namespaces) == []


def test_cleanup_when_the_test_process_is_killed():
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, 'tests'); from hosts import Hosts\n"
         "hs = Hosts(n=2); hs[0].popen(['sleep', '60'])\n"
         "print(hs.tag, hs._switch.pid, *(h.init_pid for h in hs), flush=True); time.sleep(60)"],
        cwd=hosts_mod._REPO_ROOT, stdout=subprocess.PIPE, text=True)
    tag, switch, *inits = owner.stdout.readline().split()
    assert tag.startswith(hosts_mod.PREFIX) and len(inits) == 2
    namespaces = set().union(*(namespace_ids(int(pid)) for pid in inits), namespace_ids(int(switch), SWITCH_NAMESPACES))
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while processes_in(namespaces) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_in(namespaces) == []
    assert not [pid for pid, argv in hosts_mod._marked_processes() if tag in argv]


def test_sweep_kills_only_leftovers_of_dead_owners():
    def fake_init(owner: str) -> subprocess.Popen:
        return subprocess.Popen([*PY, "-c", "import time; time.sleep(30)", hosts_mod.INIT_MARKER, "host",
                                 "blg000000", owner, "-", "-"])

    orphan = fake_init("999999999:0")  # no such pid: a dead owner
    ours = fake_init(hosts_mod._owner_id(os.getpid()))
    try:
        time.sleep(0.1)  # let both exec, so their argv is in /proc
        hosts_mod.sweep_leftovers()
        assert orphan.wait(5) == -signal.SIGKILL
        assert ours.poll() is None
    finally:
        for p in (orphan, ours):
            p.kill()
            p.wait()
