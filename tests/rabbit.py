"""The real RabbitMQ for tests: AMQP_URL when set, else testcontainers when a Docker engine
answers, else the local broker on 127.0.0.1:5672. Each test gets a vhost of its own."""

import contextlib
import os
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


class RabbitServer:
    """A reachable broker plus a way to run `rabbitmqctl` against it (for vhosts)."""

    def __init__(self, url: str, ctl: list[str] | None) -> None:
        self.url = url
        self._ctl = ctl

    def rabbitmqctl(self, *args: str) -> str:
        if self._ctl is None:
            raise RuntimeError("no rabbitmqctl for this broker")
        done = subprocess.run([*self._ctl, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    @property
    def can_make_vhosts(self) -> bool:
        return self._ctl is not None

    def url_for(self, vhost: str) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, "")))

    @contextlib.contextmanager
    def fresh_vhost(self) -> Iterator[str]:
        """A new empty vhost, guest-permitted, deleted afterwards; yields its URL."""
        vhost = f"swarm-test-{uuid.uuid4().hex[:12]}"
        user = urllib.parse.urlsplit(self.url).username or "guest"
        self.rabbitmqctl("add_vhost", vhost)
        self.rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        try:
            yield self.url_for(vhost)
        finally:
            with contextlib.suppress(Exception):
                self.rabbitmqctl("delete_vhost", vhost)


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
    return probe.returncode == 0


@contextlib.contextmanager
def rabbit_server() -> Iterator[RabbitServer]:
    if os.environ.get("AMQP_URL"):
        ctl = ["rabbitmqctl"] if shutil.which("rabbitmqctl") else None
        yield RabbitServer(os.environ["AMQP_URL"], ctl)
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13") as container:
            params = container.get_connection_params()
            url = f"amqp://guest:guest@{params.host}:{params.port}/"
            cid = container.get_wrapped_container().id
            yield RabbitServer(url, ["docker", "exec", cid, "rabbitmqctl"])
        return
    yield RabbitServer(LOCAL_URL, ["rabbitmqctl"] if shutil.which("rabbitmqctl") else None)
