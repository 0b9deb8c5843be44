"""Transport security and least privilege, against the real RabbitMQ.

- amqps: a TLS-terminating proxy (tests/tlsproxy.py) with a throwaway CA stands in for a
  TLS-enabled RabbitMQ; the daemon and the client verify its certificate through the
  `cafile` query argument of the URL, and refuse it without the right CA.
- least privilege: the daemon runs as a user whose permissions on the vhost are exactly
  `DAEMON_PERMISSIONS` (found by removing each name from each of the three regexes in turn:
  every one below is needed for the daemon to start, answer, dead-letter and report status).
"""

import secrets
import ssl
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused
from conftest import DaemonFactory, missing_requirement
from netproxy import local_target
from rabbit import RabbitServer
from raw import RawProducer, task
from tlsproxy import TlsMaterial, TlsProxy, make_tls_material

from broker.errors import AmqpUnavailable
from broker.producer.client import SwarmClient
from schemas.topology import ORIGINAL_USER_HEADER

# The daemon's permissions on its vhost (rabbitmqctl set_permissions -p VHOST USER CONF WRITE
# READ). Regexes are matched against exchange and queue names alike; `swarm.dead` is both.
#   configure: declare the exchanges, the task/control/dead queues and the outcome stream.
#   write:     bind the task queues and the dead queue (write on the queue), publish replies
#              via the default exchange, copies to swarm.results, dead letters to swarm.dead.
#   read:      bind from swarm.tasks and swarm.dead (read on the exchange), consume the task
#              queues, swarm.control and the swarm.outcomes stream.
# Not needed: write on swarm.tasks (the daemon never publishes tasks) or swarm.control, read
# on swarm.results, and any server-named (amq.gen-*) queue.
DAEMON_PERMISSIONS = {
    "configure": (
        r"^swarm\.(tasks|dead|results|control|outcomes"
        r"|tasks\.(training|inference|data_processing))$"
    ),
    "write": r"^(swarm\.(dead|results|tasks\.(training|inference|data_processing))|amq\.default)$",
    "read": r"^swarm\.(tasks|dead|control|outcomes|tasks\.(training|inference|data_processing))$",
}


# -- amqps ---------------------------------------------------------------------------------


@pytest.fixture
def tls_material(tmp_path: Path) -> TlsMaterial:
    return make_tls_material(tmp_path / "tls")


@pytest.fixture
async def tls_proxy(tls_material: TlsMaterial, amqp_url: str) -> AsyncIterator[TlsProxy]:
    target = local_target(amqp_url)
    if target is None:
        missing_requirement("the TLS proxy needs RabbitMQ on 127.0.0.1")
    async with TlsProxy(tls_material, *target) as proxy:
        yield proxy


async def test_daemon_and_client_round_trip_over_amqps(
    tls_proxy: TlsProxy, start_daemon: DaemonFactory, amqp_url: str
) -> None:
    url = tls_proxy.amqps_url(amqp_url)
    assert url.startswith("amqps://guest:guest@localhost:")
    assert "cafile=" in url

    await start_daemon(amqp_url=url)
    daemon_connections = tls_proxy.accepted
    assert daemon_connections >= 1  # a TLS handshake completed for each one

    async with SwarmClient(url) as client:
        reply = await client.submit("inference", "echo", {"over": "tls"}, wait_s=60)
    assert reply.status == "ok"
    assert reply.result == {"over": "tls"}
    assert tls_proxy.accepted > daemon_connections  # the client came through TLS too


async def test_the_tls_proxy_speaks_tls_only(tls_proxy: TlsProxy, amqp_url: str) -> None:
    """A plain amqp:// client at the TLS port gets no AMQP session (sanity of the setup)."""
    with pytest.raises(AmqpUnavailable):
        async with SwarmClient(tls_proxy.url_for(amqp_url)):
            pass
    assert tls_proxy.accepted == 0


@pytest.mark.parametrize("ca", ["none", "wrong"])
async def test_client_refuses_a_server_it_cannot_verify(
    tls_proxy: TlsProxy, amqp_url: str, tmp_path: Path, ca: str
) -> None:
    if ca == "none":  # the system's trust store, which does not hold the throwaway CA
        url = tls_proxy.amqps_url(amqp_url, use_own_ca=False)
        assert "cafile" not in url
    else:  # a valid CA file, but not the one that signed the server's certificate
        other = make_tls_material(tmp_path / "other", name="other")
        url = tls_proxy.amqps_url(amqp_url, cafile=other.ca_file)

    with pytest.raises(AmqpUnavailable, match="CERTIFICATE_VERIFY_FAILED") as raised:
        async with SwarmClient(url):
            pass
    assert isinstance(_root_cause(raised.value), ssl.SSLCertVerificationError)
    assert "guest:guest" not in str(raised.value)  # the password is not in the message
    assert tls_proxy.accepted == 0  # no handshake completed: nothing reached RabbitMQ


async def _ignore(message: AbstractIncomingMessage) -> None:
    """A consumer callback that is never meant to run."""


def _root_cause(exc: BaseException) -> BaseException:
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


# -- least privilege -----------------------------------------------------------------------


def _vhost_of(amqp_url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"


def _with_credentials(amqp_url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(amqp_url)
    netloc = (
        f"{urllib.parse.quote(user, '')}:{urllib.parse.quote(password, '')}"
        f"@{parts.hostname}:{parts.port or 5672}"
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def daemon_user_url(rabbit: RabbitServer, amqp_url: str) -> Iterator[str]:
    """A user with a random password and only DAEMON_PERMISSIONS on this test's vhost;
    deleted afterwards. Yields its URL."""
    if not rabbit.can_make_vhosts:
        missing_requirement("needs rabbitmqctl to create a user")
    user = f"swarm-daemon-{uuid.uuid4().hex[:12]}"
    password = secrets.token_hex(24)  # hex: a password starting with "-" reads as an option
    rabbit.rabbitmqctl("add_user", user, password)
    try:
        rabbit.rabbitmqctl(
            "set_permissions",
            "-p",
            _vhost_of(amqp_url),
            user,
            DAEMON_PERMISSIONS["configure"],
            DAEMON_PERMISSIONS["write"],
            DAEMON_PERMISSIONS["read"],
        )
        yield _with_credentials(amqp_url, user, password)
    finally:
        rabbit.rabbitmqctl("delete_user", user)


async def test_daemon_works_with_least_privilege(
    daemon_user_url: str, start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    print(
        "daemon permissions: configure={configure} write={write} read={read}".format(
            **DAEMON_PERMISSIONS
        )
    )
    await start_daemon(amqp_url=daemon_user_url)
    inbox = await producer.inbox()
    dead = await producer.watch_dead()

    # A reply through the default exchange, its copy to swarm.results.
    body = task("inference", "echo", {"least": "privilege"})
    await producer.publish("inference", body, reply_to=inbox.name)
    reply = (await inbox.one()).payload
    assert (reply["status"], reply["id"], reply["result"]) == ("ok", body["id"], body["args"])

    # A failure: its dead letter to swarm.dead. The producer's `user_id` (guest) is not the
    # daemon's user, so RabbitMQ would refuse it on the letter: it moves to a header.
    failing = task("training", "fail", {"message": "denied?"})
    await producer.publish("training", failing, reply_to=inbox.name, user_id="guest")
    (_, failed) = await inbox.wait_for(2)
    assert failed.payload["error"]["code"] == "handler_error"
    letter = await dead.one()
    assert msgpack.unpackb(letter.body) == failing
    assert letter.headers[ORIGINAL_USER_HEADER] == "guest"
    assert letter.message.user_id is None

    # Control: status (passive declares of the queues) and a cancel remembered in the stream.
    requests = {
        "status": {"v": 1, "op": "status"},
        "cancel": {"v": 1, "op": "cancel", "id": f"never-sent-{uuid.uuid4().hex}"},
    }
    for name, request in requests.items():
        await producer.channel.default_exchange.publish(
            aio_pika.Message(
                msgpack.packb(request),
                content_type="application/msgpack",
                correlation_id=name,
                reply_to=inbox.name,
            ),
            "swarm.control",
        )
    answers = {r.message.correlation_id: r.payload for r in (await inbox.wait_for(4))[2:]}
    assert {name: a["status"] for name, a in answers.items()} == {"status": "ok", "cancel": "ok"}
    assert set(answers["status"]["result"]) == {"pools", "nodes", "queues", "limits", "rabbitmq"}
    assert answers["cancel"]["result"]["state"] == "unseen"

    # The guest's own client sees the daemon answer as usual.
    async with SwarmClient(amqp_url) as client:
        assert (await client.submit("data_processing", "echo", 7, wait_s=60)).result == 7


@pytest.mark.parametrize(
    "attempt",
    [
        "declare-queue-outside-swarm",
        "declare-server-named-queue",
        "delete-queue-outside-swarm",
        "consume-queue-outside-swarm",
        "publish-task",
    ],
)
async def test_daemon_user_is_refused_outside_its_permissions(
    daemon_user_url: str, producer: RawProducer, attempt: str
) -> None:
    # Someone else's queue, and the topology, made by the (all-powerful) guest.
    await producer.channel.declare_queue("elsewhere.owned", durable=False, auto_delete=False)
    await producer.channel.declare_exchange(
        "swarm.tasks", aio_pika.ExchangeType.DIRECT, durable=True
    )

    connection = await aio_pika.connect(daemon_user_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
            if attempt == "declare-queue-outside-swarm":
                await channel.declare_queue("elsewhere.mine", durable=True)
            elif attempt == "declare-server-named-queue":
                await channel.declare_queue("", exclusive=True)
            elif attempt == "delete-queue-outside-swarm":
                await channel.queue_delete("elsewhere.owned")
            elif attempt == "consume-queue-outside-swarm":
                queue = await channel.get_queue("elsewhere.owned", ensure=False)
                await queue.consume(_ignore)
            else:  # the daemon's credentials cannot inject tasks
                exchange = await channel.get_exchange("swarm.tasks", ensure=False)
                await exchange.publish(aio_pika.Message(msgpack.packb(task())), "inference")
    finally:
        await connection.close()

    # Still there: the refused delete did not happen.
    assert (await producer.channel.declare_queue("elsewhere.owned", passive=True)).name
