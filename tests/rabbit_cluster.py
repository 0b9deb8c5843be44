"""A RabbitMQ cluster of three nodes on this host, beside (never touching) the system node.

Each node has a name, ports, a configuration, data and log directories, an enabled-plugins
file and an Erlang cookie of its own, all under one temporary directory; it is started with
`rabbitmq-server -detached` and joined with `rabbitmqctl join_cluster`. Nodes are killed by
the pid of their Erlang VM (`kill -9`, as a machine failure would), and removed the same way
at the end, their directories deleted. Nothing here talks to the system node."""

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Ports tried for the nodes, away from the system node (5672, 25672) and its CLI (35672+).
AMQP_PORTS = range(5781, 5881)
DIST_PORTS = range(25781, 25881)
# Each node's stream replication listeners (osiris) in a range of its own: the default range
# (6000-6500) is shared by every node of a host, and the nodes' replicas must not compete.
OSIRIS_PORTS_PER_NODE = 50
OSIRIS_FIRST_PORT = 27100
START_TIMEOUT_S = 90
CTL_TIMEOUT_S = 90


def rabbitmq_tool(name: str) -> str | None:
    """The real `rabbitmq-server` / `rabbitmqctl` script. Debian's wrapper on PATH switches
    to the `rabbitmq` user (whose HOME holds the system node's cookie); the script beside it
    runs as we are, with the environment we give it."""
    found = shutil.which(name)
    if found is None:
        return None
    real = Path(found).resolve()
    if real.name == "rabbitmq-script-wrapper":
        sibling = real.with_name(name)
        return str(sibling) if sibling.exists() else None
    return str(real)


def _free_port(candidates: range, taken: set[int]) -> int:
    for port in candidates:
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {candidates}")


@dataclass
class RabbitNode:
    index: int
    name: str
    amqp_port: int
    dist_port: int
    base: Path
    env: dict[str, str]
    pid: int | None = None
    starts: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.base / "rabbit.pid"


class RabbitCluster:
    """Three (or `size`) nodes named `swarmtest<i>-<run>@localhost`; see the module's
    docstring."""

    def __init__(self, root: Path, size: int = 3) -> None:
        server = rabbitmq_tool("rabbitmq-server")
        ctl = rabbitmq_tool("rabbitmqctl")
        if server is None or ctl is None:
            raise RuntimeError("rabbitmq-server and rabbitmqctl are needed")
        self.server = server
        self.ctl_tool = ctl
        self.root = root
        home = root / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        taken: set[int] = set()
        # Names of this cluster alone: epmd refuses a name that a node left behind by an
        # interrupted run still holds.
        self.run = secrets.token_hex(3)
        self.nodes = [
            self._node(i, home, _free_port(AMQP_PORTS, taken), _free_port(DIST_PORTS, taken))
            for i in range(1, size + 1)
        ]

    def _node(self, index: int, home: Path, amqp_port: int, dist_port: int) -> RabbitNode:
        base = self.root / f"node{index}"
        base.mkdir()
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{amqp_port}\n"
            "listeners.ssl = none\n"
            # Small machines: the default 50% watermark and disk limit must not block
            # publishers of a test.
            "disk_free_limit.absolute = 1MB\n"
        )
        osiris_first = OSIRIS_FIRST_PORT + (index - 1) * OSIRIS_PORTS_PER_NODE
        (base / "advanced.config").write_text(
            f"[{{osiris, [{{port_range, {{{osiris_first}, "
            f"{osiris_first + OSIRIS_PORTS_PER_NODE - 1}}}}}]}}].\n"
        )
        (base / "enabled_plugins").write_text("[].\n")  # no plugin listeners to collide
        (base / "rabbitmq-env.conf").write_text("")  # not the system node's name and flags
        env = {
            **os.environ,
            "HOME": str(home),  # the cookie
            "RABBITMQ_NODENAME": f"swarmtest{index}-{self.run}@localhost",
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        env.pop("RABBITMQ_NODE_PORT", None)
        return RabbitNode(
            index, f"swarmtest{index}-{self.run}@localhost", amqp_port, dist_port, base, env
        )

    # -- commands ----------------------------------------------------------------------------
    def ctl(self, node: RabbitNode, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        done = subprocess.run(
            [self.ctl_tool, "-n", node.name, *args],
            env=node.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} failed: "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done.stdout

    def _launch(self, node: RabbitNode) -> None:
        node.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [self.server, "-detached"],
            env=node.env,
            cwd=node.base,
            check=True,
            capture_output=True,
            timeout=CTL_TIMEOUT_S,
        )

    def _await_booted(self, node: RabbitNode) -> None:
        """Until the node's Erlang VM wrote its pid and RabbitMQ is fully up on it."""
        self.ctl(node, "wait", "--timeout", str(START_TIMEOUT_S), str(node.pid_file))
        node.pid = int(node.pid_file.read_text().split()[0])

    def start(self) -> None:
        """Boot every node (at once), then join the others to the first."""
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._await_booted(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "reset")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self.ctl(node, "await_startup")

    def restart(self, node: RabbitNode) -> None:
        """Boot a killed node again with its data: it rejoins the cluster by itself."""
        self._launch(node)
        self._await_booted(node)

    def running_nodes(self, asked: RabbitNode) -> list[str]:
        status = json.loads(self.ctl(asked, "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def queue_members(self, asked: RabbitNode, queue: str) -> dict[str, object]:
        """A replicated queue's type, leader, members and online members, as `asked` sees it."""
        rows = json.loads(
            self.ctl(
                asked,
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "online",
                "--formatter",
                "json",
            )
        )
        for row in rows:
            if row["name"] == queue:
                return dict(row)
        raise KeyError(queue)

    async def kill(self, node: RabbitNode) -> None:
        """`kill -9` the node's Erlang VM and wait until the process is gone."""
        assert node.pid is not None
        pid, node.pid = node.pid, None
        with _pidfd(pid) as pidfd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pidfd is not None:  # Linux 5.3 and later
                await _readable(pidfd)  # a pidfd turns readable when its process exits

    def remove(self) -> None:
        """Kill every node's Erlang VM (by its pid) and delete the cluster's directories."""
        for node in self.nodes:
            pid = node.pid
            if pid is None and node.pid_file.exists():
                with contextlib.suppress(ValueError, OSError):
                    pid = int(node.pid_file.read_text().split()[0])
            if pid is not None and _is_our_vm(pid, node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            node.pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def _is_our_vm(pid: int, node: RabbitNode) -> bool:
    """The process is still this node's Erlang VM (a pid file can outlive its process): its
    environment names the node, as we started it."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RABBITMQ_NODENAME={node.name}".encode() in environ


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
