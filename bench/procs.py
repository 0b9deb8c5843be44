"""Processes for the bench: RabbitMQ vhosts, a Ray head of its own, process trees and RSS.

Everything the bench starts runs in a process group of its own and is stopped by that group's
id: never `ray stop` (it would stop every Ray on the machine, other people's test runs too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Ray's own service processes, not Swarm's actors.
RAY_SERVICE_TITLES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def tool(name: str) -> str:
    """A console script of the project's virtualenv, else the one on PATH."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def ray_auth_mode() -> str:
    """The Ray auth mode for the bench's Ray and its daemons, set explicitly on both sides:
    `ray start` turns token auth on by itself when a token exists (~/.ray/auth_token), but a
    driver given an explicit address (RAY_ADDRESS) only sends it with RAY_AUTH_MODE=token.
    Yours when set; else token when a token exists, as `ray start` would; else disabled."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"]
    has_token = (
        bool(os.environ.get("RAY_AUTH_TOKEN"))
        or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "/nonexistent").is_file()
        or (Path.home() / ".ray" / "auth_token").is_file()
    )
    return "token" if has_token else "disabled"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- RabbitMQ vhosts -------------------------------------------------------------------------


class Rabbit:
    def __init__(self, url: str) -> None:
        self.url = url
        self.user = urllib.parse.urlsplit(url).username or "guest"

    def ctl(self, *args: str, attempts: int = 4) -> None:
        """Run rabbitmqctl; tried again on failure (it fails now and then when other
        rabbitmqctl calls run at the same time)."""
        for attempt in range(attempts):
            done = subprocess.run(
                ["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False
            )
            if done.returncode == 0:
                return
            if attempt < attempts - 1:
                time.sleep(1.0 + attempt)
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()[:3]
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {' / '.join(detail)}")

    def url_for(self, vhost: str) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, "")))

    @contextlib.contextmanager
    def fresh_vhost(self, label: str) -> Iterator[str]:
        """A new empty vhost for one system's round; deleted afterwards (in the background,
        so the next round does not wait for it). Yields its URL."""
        vhost = f"swarm-bench-{label}-{uuid.uuid4().hex[:8]}"
        self.ctl("add_vhost", vhost)
        try:
            self.ctl("set_permissions", "-p", vhost, self.user, ".*", ".*", ".*")
            yield self.url_for(vhost)
        finally:
            deleter = subprocess.Popen(
                ["rabbitmqctl", "delete_vhost", vhost],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _pending_deletes.append(deleter)


_pending_deletes: list[subprocess.Popen[bytes]] = []


def wait_for_vhost_deletes(timeout_s: float = 120.0) -> None:
    for deleter in _pending_deletes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            deleter.wait(timeout_s)
    _pending_deletes.clear()


# -- process groups --------------------------------------------------------------------------


def stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process group we started, then SIGKILL what is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Any process of the group that is not a zombie."""
    return any(info.pgid == pgid and info.state != "Z" for info in scan().values())


def stop_process(process: subprocess.Popen[bytes], grace_s: float) -> int | None:
    """SIGTERM one process we started and wait for it; SIGKILL after `grace_s`. Then its
    whole group (it was started as a session leader) goes too, and any descendant that left
    the group (Ray's workers start sessions of their own). Returns its exit status."""
    table = scan()
    leftovers = descendants(process.pid, table)
    code: int | None = None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    else:
        code = process.returncode
    stop_group(process.pid, grace_s=5.0)
    kill_leftovers(leftovers, table)
    return code


def kill_leftovers(pids: set[int], table: dict[int, ProcInfo], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, those of `pids` still alive as the same processes (same start
    time as in `table`, so a recycled pid is never hit)."""

    def alive() -> list[int]:
        found = []
        for pid in pids:
            now = read_proc(pid)
            if now is not None and now.state != "Z" and now.start_ticks == table[pid].start_ticks:
                found.append(pid)
        return found

    for signum in (signal.SIGTERM, signal.SIGKILL):
        remaining = alive()
        if not remaining:
            return
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)


# -- /proc -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    start_ticks: int
    rss_kib: int


def read_proc(pid: int) -> ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = raw[raw.rfind(")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        state=fields[0],
        start_ticks=int(fields[19]),
        rss_kib=int(fields[21]) * PAGE_KIB,
    )


def scan() -> dict[int, ProcInfo]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                found[info.pid] = info
    return found


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS from /proc/<pid>/status (what `ps` shows as RSS); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0  # a zombie has no VmRSS line


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int, table: dict[int, ProcInfo]) -> set[int]:
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def is_actor(pid: int) -> bool:
    """A Ray worker process running an actor (Ray retitles it `ray::<Class>...`)."""
    title = cmdline(pid)
    return title.startswith("ray::") and not title.startswith(RAY_SERVICE_TITLES)


# -- RSS sampling ----------------------------------------------------------------------------


@dataclass
class PhasePeak:
    daemon_kib: int = 0
    actors_kib: int = 0
    total_kib: int = 0  # daemon + actors, sampled together
    tree_kib: int = 0  # everything under the daemon (an embedded Ray's services too)
    actors: int = 0


@dataclass
class RssSampler:
    """Samples a daemon's VmRSS (and its actors') on a thread, keeping the peak per phase.

    `find_actors` names the actor processes of this daemon; it is called once a second (a
    /proc scan), while the known pids are read every `period_s` and at every phase change
    (so that a phase shorter than the period is sampled too)."""

    pid: int
    find_actors: Callable[[], set[int]]
    period_s: float = 0.1
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    _phase: str = "start"
    _actors: set[int] = field(default_factory=set)
    _tree: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._rescan()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        """End the current phase with a sample, and start `name` with one."""
        self._sample()
        self._phase = name
        self._sample()

    def stop(self) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def overall(self) -> PhasePeak:
        peak = PhasePeak()
        for phase in self.phases.values():
            peak.daemon_kib = max(peak.daemon_kib, phase.daemon_kib)
            peak.actors_kib = max(peak.actors_kib, phase.actors_kib)
            peak.total_kib = max(peak.total_kib, phase.total_kib)
            peak.tree_kib = max(peak.tree_kib, phase.tree_kib)
            peak.actors = max(peak.actors, phase.actors)
        return peak

    def _rescan(self) -> None:
        try:
            actors = self.find_actors()
            tree = descendants(self.pid, scan())
        except Exception:
            return
        with self._lock:
            self._actors, self._tree = actors, tree

    def _sample(self) -> bool:
        """One sample into the current phase; False once the daemon is gone."""
        with self._lock:
            daemon = vm_rss_kib(self.pid)
            if daemon is None:
                return False
            actor_kib = sum(vm_rss_kib(pid) or 0 for pid in self._actors)
            tree_kib = daemon + sum(vm_rss_kib(pid) or 0 for pid in self._tree)
            peak = self.phases.setdefault(self._phase, PhasePeak())
            peak.daemon_kib = max(peak.daemon_kib, daemon)
            peak.actors_kib = max(peak.actors_kib, actor_kib)
            peak.total_kib = max(peak.total_kib, daemon + actor_kib)
            peak.tree_kib = max(peak.tree_kib, tree_kib)
            peak.actors = max(peak.actors, len(self._actors))
            return True

    def _loop(self) -> None:
        next_scan = time.monotonic() + 1.0
        while not self._stop.is_set():
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + 1.0
                self._rescan()
            if not self._sample():
                return
            self._stop.wait(self.period_s)


# -- a Ray head for the whole bench ----------------------------------------------------------


def _ray_client_installed() -> bool:
    try:
        from ray._private.utils import get_ray_client_dependency_error
    except ImportError:
        return False
    return get_ray_client_dependency_error() is None


class SharedRay:
    """`ray start --head --num-cpus=N` once for the bench, in its own temp dir (so no other
    `ray.init()` on the machine finds it) and its own process group (so it is stopped alone)."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.address = ""
        self.temp_dir = ""
        self.pgid: int | None = None
        self.start_s = 0.0

    def start(self, log: Path) -> SharedRay:
        self.temp_dir = tempfile.mkdtemp(prefix="swb-ray-", dir="/tmp")
        port = free_port()
        started = time.monotonic()
        command = [
            tool("ray"),
            "start",
            "--head",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--dashboard-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
        ]
        if _ray_client_installed():
            # Off its default port 10001; with the minimal `ray` package there is no Ray
            # Client server to place, and naming a port for it is an error.
            command.append(f"--ray-client-server-port={free_port()}")
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "RAY_AUTH_MODE": ray_auth_mode()},
            )
            self.pgid = process.pid
            if process.wait(180) != 0:
                self.stop()
                raise RuntimeError(f"`ray start` failed; see {log}")
        self.address = f"127.0.0.1:{port}"
        self.start_s = time.monotonic() - started
        return self

    def actors_since(self, start_ticks: int) -> set[int]:
        """Actor processes of this Ray started at or after `start_ticks` (one daemon's).
        Ray's workers are children of its raylet but each in a session of its own."""
        table = scan()
        raylets = {
            info.pid
            for info in table.values()
            if info.pgid == self.pgid and cmdline(info.pid).split(" ", 1)[0].endswith("raylet")
        }
        return {
            info.pid
            for info in table.values()
            if info.ppid in raylets
            and info.state != "Z"
            and info.start_ticks >= start_ticks
            and is_actor(info.pid)
        }

    def stop(self) -> None:
        if self.pgid is not None:
            table = scan()
            members = {info.pid for info in table.values() if info.pgid == self.pgid}
            leftovers = set().union(*(descendants(pid, table) for pid in members)) - members
            stop_group(self.pgid)
            kill_leftovers(leftovers, table)
            self.pgid = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = ""


def embedded_actors(daemon_pid: int) -> set[int]:
    """Actor processes under a daemon that runs its own Ray."""
    table = scan()
    return {
        pid for pid in descendants(daemon_pid, table) if table[pid].state != "Z" and is_actor(pid)
    }
