"""Several simulated hosts on one Linux machine, for tests that need a real multi-host fleet.

Beluga-KV's pool is a CXL device mapped by every host, while everything else (doorbell sockets under
/dev/shm, TCP between servers and clients, process crashes) is per host. One machine cannot show the
bugs that hide in that difference: every process shares /dev/shm, talks over one loopback and lives in
one PID space. This module gives each simulated host its own namespaces instead:

- PID namespace: a host's processes see small pids of their own, and two hosts reuse the same pids
  (as two real machines do), so pids written into the shared pool are ambiguous across hosts.
- mount namespace with a private tmpfs on /dev/shm: unix sockets and files there are per host. The
  pool file is bind-mounted at the same path into every host: it stands in for the CXL DAX node.
- network namespace: loopback plus one veth into a bridge. The bridge lives in a separate "switch"
  namespace, so nothing is added to this machine's own network and no packet leaves the test's
  namespaces (the hosts have no default route).
- UTS and IPC namespaces, so the hostname and System V IPC are per host too.

The root filesystem is shared, so `host.popen([sys.executable, "-m", "beluga", ...])` runs this
checkout with this venv.

    with Hosts(n=3, pool_file="/dev/shm/beluga-test-xyz") as hosts:
        h0, h1, h2 = hosts
        server = h0.popen([sys.executable, "-m", "beluga", ...], env={...})
        h1.run([sys.executable, "-c", "..."], timeout=30, check=True)
        h1.link_down(); ...; h1.link_up()    # unplug / replug h1's cable at the switch
        h1.kill_all()                          # power-cut h1: every process on it dies
        h1.restart()                           # boot it again (same name, ip, pool file)

How a host works: `unshare` starts this file as the host's init (PID 1 of the new namespaces; see
`_init_main`). The init mounts /dev/shm and the pool file, says "ready", then only reaps orphans.
Commands enter the host with `nsenter --target <init>`. Killing the init with SIGKILL makes the
kernel kill every process of its PID namespace, and when the last process is gone the network and
mount namespaces (with their veth and mounts) go too: that is both `kill_all` and the cleanup.

Cleanup happens on context exit, on garbage collection or interpreter exit (weakref.finalize), and
even if the test process is SIGKILLed: each `unshare` gets SIGKILL when the thread that started it
dies (PR_SET_PDEATHSIG) and passes it on to the init (`unshare --kill-child`). A new `Hosts` also
sweeps leftovers of crashed runs whose owner process is gone (see `sweep_leftovers`).

Requires root, util-linux (unshare, nsenter >= 2.38 for --wdns) and iproute2. Linux only.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence

log = logging.getLogger("beluga.tests.hosts")

PREFIX = "blg"  # every Hosts is tagged PREFIX + 6 hex digits; interface names start with the tag
INIT_MARKER = "--beluga-hosts-init"  # in the argv of every init and unshare we start: what the sweep looks for
MAX_HOSTS = 16
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
HOST_NAMESPACES = ("pid", "mount", "net", "uts", "ipc")  # the namespaces nsenter enters for a command

_PR_SET_PDEATHSIG = 1
_MS_NOSUID, _MS_NODEV, _MS_BIND = 2, 4, 4096


class Host:
    """One simulated host. Made by `Hosts`; use it until the `Hosts` is closed.

    Attributes: `name` ("h0"...), `ip` (its address on the switch), `pool_path` (where the pool file is
    inside the host: the same path as outside, or None), `init_pid` (the pid of its init as this machine
    sees it, for nsenter or /proc/<pid>/ns/*; changes on restart).
    """

    def __init__(self, index: int, ip: str, tag: str, switch_pid: int, pool_path: str | None, state: _State):
        self.index, self.name, self.ip, self.pool_path = index, f"h{index}", ip, pool_path
        self.hostname = f"{tag}-h{index}"
        self._prefixlen = 24
        self._host_if, self._switch_if, self._bridge = f"{tag}h{index}", f"{tag}s{index}", f"{tag}br"
        self._tag, self._switch_pid, self._state = tag, switch_pid, state
        self._init: _Init | None = None
        self._procs: list[HostProcess] = []

    def __repr__(self) -> str:
        return f"<Host {self.name} ip={self.ip} init_pid={self.init_pid}>"

    @property
    def init_pid(self) -> int | None:
        return self._init.pid if self._init and self.alive else None

    @property
    def alive(self) -> bool:
        """False after kill_all() until restart()."""
        return self._init is not None and self._init.unshare.poll() is None

    # ---- processes ---------------------------------------------------------------------------------

    def popen(self, args: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
              **kwargs) -> HostProcess:
        """subprocess.Popen, but the command runs inside this host's namespaces.

        The environment is PATH and HOME from this process plus `env` (nothing else leaks in, so a
        test states everything its processes depend on); cwd defaults to the repository root.
        Other keyword arguments (stdin, stdout, stderr, text, ...) go to Popen.
        """
        if not self.alive:
            raise RuntimeError(f"{self.name} is down (kill_all); call restart() first")
        full_env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        full_env.update(env or {})
        cmd = ["nsenter", f"--target={self._init.pid}", *(f"--{ns}" for ns in HOST_NAMESPACES),
               f"--wdns={cwd or _REPO_ROOT}", "--", *args]
        proc = HostProcess(cmd, env=full_env, **kwargs)
        self._procs.append(proc)
        self._state.procs.append(proc)
        return proc

    def run(self, args: Sequence[str], *, input=None, capture_output: bool = False, timeout: float | None = None,
            check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run inside this host (same arguments; the command is killed on timeout)."""
        if capture_output:
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        if input is not None:
            kwargs["stdin"] = subprocess.PIPE
        with self.popen(args, **kwargs) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except BaseException:
                proc.kill()
                proc.communicate()
                raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def kill_all(self) -> None:
        """SIGKILL every process of this host at once, like pulling its power plug.

        The kernel kills the whole PID namespace when its init dies; we return once all of them are
        dead and their Popen objects (from popen()) have a returncode. The host's /dev/shm and
        network interface are gone too; restart() brings up a fresh host with the same identity.
        """
        if self._init is None:
            return
        self._init.kill()
        for proc in self._procs:
            _wait_or_kill(proc)
        self._procs.clear()
        log.info("%s: killed all its processes", self.name)

    def restart(self) -> None:
        """Boot the host again (kill_all() first if it is up): same name, ip and pool file, new pids."""
        self.kill_all()
        # The old veth pair goes away with the old network namespace, which the kernel frees
        # asynchronously: delete our end now so the name is free.
        _ip_batch(self._switch_pid, [f"link del {self._switch_if}"], check=False)
        self._start()

    # ---- network ----------------------------------------------------------------------------------

    def link_down(self) -> None:
        """Cut the host off the network: its port on the switch goes down (an unplugged cable).

        Inside the host the interface stays configured but loses carrier, so packets are dropped:
        new connections to or from it time out and established ones stall, as in a real partition.
        """
        _ip_batch(self._switch_pid, [f"link set {self._switch_if} down"])
        log.info("%s: link down", self.name)

    def link_up(self) -> None:
        """Plug the cable back in (undoes link_down)."""
        _ip_batch(self._switch_pid, [f"link set {self._switch_if} up"])
        log.info("%s: link up", self.name)

    # ---- internals --------------------------------------------------------------------------------

    def _start(self) -> None:
        self._init = _Init.start("host", self._tag, self._state, pool_file=self.pool_path, hostname=self.hostname)
        _ip_batch(self._switch_pid, [f"link add {self._switch_if} type veth peer name {self._host_if} "
                                     f"netns {self._init.pid}",
                                     f"link set {self._switch_if} master {self._bridge}",
                                     f"link set {self._switch_if} up"])
        _ip_batch(self._init.pid, ["link set lo up",
                                   f"addr add {self.ip}/{self._prefixlen} dev {self._host_if}",
                                   f"link set {self._host_if} up"])
        log.info("%s: up, ip %s, init pid %d", self.name, self.ip, self._init.pid)


class Hosts:
    """n simulated hosts on one switch (a context manager; see the module docstring).

    pool_file: a file on this machine's /dev/shm, bind-mounted at the same path into every host (the
    shared CXL memory). Created empty (and removed on close) if missing, since a bind mount needs an
    existing file; code inside the hosts must therefore resize it in place, not unlink and recreate.

    Create it in the thread that will also close it (normally the test's main thread): the hosts are
    killed when that thread exits, which is what cleans up after a crashed test process.
    """

    def __init__(self, n: int = 2, pool_file: str | None = None):
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"n must be in 1..{MAX_HOSTS}, got {n}")
        _check_prerequisites()
        sweep_leftovers()
        self.tag = PREFIX + secrets.token_hex(3)
        self.subnet = _free_subnet()
        self._state = _State()
        # Registered first, so a failure half-way through the start still cleans up what was made.
        self._finalizer = weakref.finalize(self, self._state.teardown, self.tag)
        try:
            if pool_file is not None:
                pool_file = os.path.abspath(pool_file)
                if not os.path.exists(pool_file):
                    open(pool_file, "x").close()
                    self._state.created_files.append(pool_file)
            self._switch = _Init.start("switch", self.tag, self._state)
            _ip_batch(self._switch.pid, ["link set lo up", f"link add {self.tag}br type bridge",
                                         f"link set {self.tag}br up"])
            self.hosts = [Host(i, str(self.subnet[i + 1]), self.tag, self._switch.pid, pool_file, self._state)
                          for i in range(n)]
            for host in self.hosts:
                host._start()
        except BaseException:
            self.close()
            raise
        log.info("hosts %s up: %d hosts on %s", self.tag, n, self.subnet)

    def close(self) -> None:
        """Kill every process and remove every namespace, interface, mount and file we made. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]


class HostProcess(subprocess.Popen):
    """The Popen that Host.popen returns: an `nsenter` whose child is the command inside the host.

    Why a subclass: nsenter forks to enter the PID namespace and waits for its child, but does not
    forward signals. send_signal (and so terminate/kill) therefore signals the child; nsenter then
    exits with the child's status (or dies by the same signal), so wait()/returncode work as usual.
    `pid` is nsenter's pid; `inner_pid` the command's pid as this machine sees it.
    """

    @property
    def inner_pid(self) -> int | None:
        children = _children(self.pid)
        return children[0] if children else None

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is not None:
            return
        # Before nsenter has forked (or after its child is gone) there is no child: signal nsenter,
        # which then never starts the command.
        try:
            os.kill(self.inner_pid or self.pid, sig)
        except ProcessLookupError:
            pass


def sweep_leftovers() -> None:
    """Best effort: kill the hosts of crashed runs, and delete stray interfaces named like ours.

    A run's inits carry INIT_MARKER and their owner's pid and start time in their argv; those whose
    owner is gone are killed (which frees their namespaces). Hosts of live runs are left alone.
    """
    for pid, argv in _marked_processes():
        try:
            owner = argv[argv.index(INIT_MARKER) + 3]
            dead = owner != _owner_id(int(owner.split(":")[0]))
        except (ValueError, IndexError):
            continue
        if dead:
            log.warning("sweeping leftover host process %d of a dead run: %s", pid, " ".join(argv))
            _kill(pid)
    # We never create interfaces in this namespace; an earlier version or a manual run might have.
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in re.findall(rf"^\d+: ({PREFIX}[0-9a-f]{{6}}\w*)[@:]", links, re.M):
        log.warning("sweeping leftover interface %s", name)
        subprocess.run(["ip", "link", "del", name], capture_output=True)


# ---- internals ---------------------------------------------------------------------------------------

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _State:
    """What a Hosts must clean up. Kept apart from Hosts so the finalizer does not keep the Hosts alive."""

    def __init__(self):
        self.inits: list[_Init] = []
        self.procs: list[subprocess.Popen] = []  # processes started in the hosts, to reap
        self.created_files: list[str] = []
        self.closed = False

    def teardown(self, tag: str) -> None:
        self.closed = True
        for init in reversed(self.inits):  # hosts first, then the switch
            try:
                init.kill()
            except Exception:
                log.exception("%s: could not stop init %d", tag, init.pid)
        for proc in self.procs:
            _wait_or_kill(proc)
        for path in self.created_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("hosts %s torn down", tag)


class _Init:
    """The init (PID 1) of one host or of the switch, started through `unshare`."""

    def __init__(self, unshare: subprocess.Popen, pid: int, pidfd: int):
        self.unshare, self.pid, self.pidfd = unshare, pid, pidfd

    @classmethod
    def start(cls, role: str, tag: str, state: _State, pool_file: str | None = None, hostname: str = "") -> _Init:
        if state.closed:
            raise RuntimeError(f"hosts {tag} are closed")
        ns = ["--pid", "--fork", "--net"]
        if role == "host":
            ns += ["--mount", "--mount-proc", "--propagation=private", "--uts", "--ipc"]
        cmd = ["unshare", *ns, "--kill-child=SIGKILL", "--",
               sys.executable, "-I", "-S", os.path.abspath(__file__),
               INIT_MARKER, role, tag, _owner_id(os.getpid()), pool_file or "-", hostname or "-"]
        unshare = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                   preexec_fn=_die_with_parent, start_new_session=True)
        state.procs.append(unshare)  # reaped on teardown even if the start fails below
        with unshare.stdout:
            line = _read_line(unshare.stdout, START_TIMEOUT_S)
            if line != "ready":
                unshare.kill()
                unshare.wait()
                raise RuntimeError(f"{tag} {role} init failed to start: {line or 'no output'}")
        # Only child of unshare = the init; open a pidfd now so a later kill cannot hit a reused pid.
        (pid,) = _children(unshare.pid)
        init = cls(unshare, pid, os.pidfd_open(pid))
        state.inits.append(init)
        return init

    def kill(self) -> None:
        """SIGKILL the init and wait until its unshare has reaped it, i.e. until its PID namespace is empty."""
        if self.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self.pidfd)
        self.pidfd = -1
        _wait_or_kill(self.unshare)


def _init_main(role: str, tag: str, owner: str, pool_file: str, hostname: str) -> None:
    """The init of a host or the switch: PID 1 of its namespaces (runs in a process of its own).

    Sets up the host's mounts, prints "ready" (or "error ..." with the reason) and then reaps orphans
    forever: the processes of the host are re-parented to it when their parent exits.
    """
    try:
        if role == "host":
            libc = ctypes.CDLL(None, use_errno=True)

            def mount(src: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
                if libc.mount(src.encode(), target.encode(), fstype and fstype.encode(), flags,
                              data and data.encode()) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mount {src} on {target}: {os.strerror(err)}")

            # Open the pool file before the private tmpfs hides this machine's /dev/shm, then bind the
            # open file (through /proc/self/fd) onto an empty file at the same path in the new tmpfs.
            pool_fd = os.open(pool_file, os.O_RDONLY) if pool_file != "-" else None
            mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")
            if pool_fd is not None:
                if pool_file.startswith("/dev/shm/"):  # elsewhere it is on the shared root filesystem
                    os.makedirs(os.path.dirname(pool_file), exist_ok=True)
                    open(pool_file, "x").close()
                    mount(f"/proc/self/fd/{pool_fd}", pool_file, None, _MS_BIND, None)
                os.close(pool_fd)
            import socket
            socket.sethostname(hostname)
    except Exception as e:
        print("error", json.dumps(f"{type(e).__name__}: {e}"), flush=True)
        sys.exit(1)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:  # a blocked SIGCHLD stays pending, so none is missed between the reap and the wait
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        signal.sigtimedwait({signal.SIGCHLD}, 60)


def _check_prerequisites() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        raise RuntimeError("Hosts needs root on Linux (it creates namespaces)")
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"Hosts needs {', '.join(missing)} on PATH")


def _free_subnet() -> ipaddress.IPv4Network:
    """A random private /24 in 10.200-250.x.0 that no route of this machine overlaps.

    (The hosts' addresses live only in their own namespaces, but a test printing an address that is
    also reachable from this machine would be confusing.)
    """
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                                       capture_output=True, text=True, check=True).stdout or "[]")
    taken = [ipaddress.ip_network(r["dst"], strict=False) for r in routes if r.get("dst", "default") != "default"]
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError("no free 10.200-250.x.0/24 subnet")


def _ip_batch(netns_pid: int, commands: list[str], check: bool = True) -> None:
    """Run `ip` commands in the network namespace of netns_pid (only: ip needs this machine's PIDs)."""
    proc = subprocess.run(["nsenter", f"--target={netns_pid}", "--net", "ip", "-batch", "-"],
                          input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip in netns of {netns_pid} failed: {commands}: {proc.stderr.strip()}")


def _read_line(pipe, timeout: float) -> str:
    """One line from a pipe, or what came before EOF or the timeout."""
    deadline, data = time.monotonic() + timeout, b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            break
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _owner_id(pid: int) -> str:
    """pid:start-time, which tells a live owner from a dead one whose pid was reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}:{f.read().rsplit(')', 1)[1].split()[19]}"
    except (FileNotFoundError, IndexError):
        return f"{pid}:gone"


def _marked_processes() -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if INIT_MARKER in argv:
                found.append((int(entry), argv))
    return found


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (the test crashed)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_or_kill(proc: subprocess.Popen) -> None:
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("pid %d still running %.0f s after its host died; killing it", proc.pid, STOP_TIMEOUT_S)
        proc.kill()
        proc.wait()


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == INIT_MARKER:
    _init_main(*sys.argv[2:])
