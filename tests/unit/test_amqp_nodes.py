"""Several RabbitMQ nodes: URL lists as settings give them, the order nodes are tried in, and
the daemon's ingress moving to the next node when its connection is lost. No RabbitMQ."""

import random

import pytest
from fakes.server import MemoryBroker
from fakes.swarm import MemorySwarm

from broker.amqp import ingress as ingress_module
from broker.amqp.nodes import AmqpNodes, open_on_a_node
from broker.amqp.session import AmqpSession
from broker.amqp.urls import redact, split_urls
from broker.errors import AmqpUnavailable
from broker.settings import Settings

ONE, TWO, THREE = "amqp://u:p1@one:5672/", "amqp://u:p2@two:5672/", "amqp://u:p3@three:5672/"


# -- parsing -------------------------------------------------------------------------------------
def test_a_comma_separated_string_and_a_list_give_the_same_urls() -> None:
    assert split_urls(f"{ONE},{TWO}, {THREE}") == (ONE, TWO, THREE)
    assert split_urls([ONE, TWO, THREE]) == (ONE, TWO, THREE)
    assert split_urls(ONE) == (ONE,)
    assert split_urls(f"{ONE},, ,") == (ONE,)


def test_a_comma_inside_a_url_stays_in_it() -> None:
    tls = "amqps://u:p,w@one:5671/vh?cafile=/etc/ca,1.pem"
    assert split_urls(f"{tls},{TWO}") == (tls, TWO)


def test_every_password_is_masked() -> None:
    assert redact(ONE) == "amqp://u:***@one:5672/"
    masked = redact(f"{ONE},{TWO}")
    assert masked == "amqp://u:***@one:5672/,amqp://u:***@two:5672/"
    assert redact("amqp://one:5672/") == "amqp://one:5672/"


def test_settings_take_a_list_from_toml_and_a_string_from_the_environment() -> None:
    from_list = Settings(amqp_url=[ONE, TWO])
    from_string = Settings(amqp_url=f"{ONE},{TWO}")
    assert from_list.amqp_nodes().urls == from_string.amqp_nodes().urls == (ONE, TWO)
    assert from_list.effective()["amqp_url"] == "amqp://u:***@one:5672/,amqp://u:***@two:5672/"
    assert Settings(amqp_url=ONE).effective()["amqp_url"] == "amqp://u:***@one:5672/"
    with pytest.raises(ValueError, match="no RabbitMQ URL"):
        Settings(amqp_url="")


# -- rotation ------------------------------------------------------------------------------------
def test_a_round_starts_with_the_first_node_then_after_the_one_lost() -> None:
    nodes = AmqpNodes([ONE, TWO, THREE])
    assert nodes.round() == [ONE, TWO, THREE] and nodes.in_use is None
    nodes.connected(TWO)
    assert nodes.in_use == TWO
    assert nodes.round() == [TWO, THREE, ONE], "connected: the same node first"
    nodes.lost()
    assert nodes.in_use is None
    assert nodes.round() == [THREE, ONE, TWO], "lost: the node after it first, it last"
    nodes.connected(THREE)
    nodes.lost()
    assert nodes.round() == [ONE, TWO, THREE], "wraps around"


def test_one_url_is_always_the_whole_round() -> None:
    nodes = AmqpNodes(ONE)
    nodes.connected(ONE)
    nodes.lost()
    assert nodes.round() == [ONE]


def test_a_node_named_twice_is_tried_once() -> None:
    assert AmqpNodes([ONE, TWO, ONE]).urls == (ONE, TWO)


def test_shuffled_once_then_rotated_in_that_order() -> None:
    nodes = AmqpNodes([ONE, TWO, THREE], shuffle=True, rng=random.Random(7))
    order = nodes.urls
    assert sorted(order) == sorted([ONE, TWO, THREE])
    assert nodes.round() == list(order)
    nodes.connected(order[0])
    nodes.lost()
    assert nodes.round() == [order[1], order[2], order[0]]
    assert {AmqpNodes([ONE, TWO, THREE], shuffle=True).urls for _ in range(50)} != {order}


def test_the_status_names_the_node_in_use_masked() -> None:
    nodes = AmqpNodes([ONE, TWO])
    assert nodes.describe() == {"node": None, "nodes": [redact(ONE), redact(TWO)]}
    nodes.connected(TWO)
    assert nodes.describe()["node"] == "amqp://u:***@two:5672/"


# -- opening on a node ---------------------------------------------------------------------------
class Refusing:
    """Opens on every URL but those in `down`; records the URLs tried."""

    def __init__(self, *down: str) -> None:
        self.down = set(down)
        self.tried: list[str] = []

    async def __call__(self, url: str) -> str:
        self.tried.append(url)
        if url in self.down:
            raise AmqpUnavailable(f"cannot reach RabbitMQ at {redact(url)}: refused") from (
                ConnectionRefusedError(f"refused by {url.split('@')[-1]}")
            )
        return url


async def test_each_node_is_tried_in_turn_until_one_opens() -> None:
    nodes = AmqpNodes([ONE, TWO, THREE])
    opener = Refusing(ONE, TWO)
    failed: list[str] = []
    opened = await open_on_a_node(nodes, opener, lambda url, exc: failed.append(url))
    assert opened == THREE and nodes.in_use == THREE
    assert opener.tried == [ONE, TWO, THREE] and failed == [ONE, TWO]


async def test_with_one_url_its_own_error_is_raised() -> None:
    with pytest.raises(AmqpUnavailable, match=r"^cannot reach RabbitMQ at amqp://u:\*\*\*@one"):
        await open_on_a_node(AmqpNodes(ONE), Refusing(ONE))


async def test_with_every_node_down_the_error_names_each_node_masked() -> None:
    nodes = AmqpNodes([ONE, TWO])
    with pytest.raises(AmqpUnavailable) as raised:
        await open_on_a_node(nodes, Refusing(ONE, TWO))
    message = str(raised.value)
    assert "any of its 2 nodes" in message
    assert "amqp://u:***@one:5672/: ConnectionRefusedError" in message
    assert "amqp://u:***@two:5672/: ConnectionRefusedError" in message
    assert "p1" not in message and "p2" not in message
    assert nodes.in_use is None


# -- the daemon's ingress --------------------------------------------------------------------------
class NodeOpener:
    """Stands in for AmqpSession in the ingress: a session on the memory broker for every node
    but those in `down`, which refuse; records the URLs tried."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.down: set[str] = set()
        self.tried: list[str] = []

    async def open(self, url: str, prefetch: int) -> AmqpSession:
        self.tried.append(url)
        if url in self.down:
            raise AmqpUnavailable(f"cannot reach RabbitMQ at {redact(url)}")
        return await self.broker.open_session()


async def test_the_ingress_moves_to_the_next_node_that_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    swarm = MemorySwarm(monkeypatch)
    opener = NodeOpener(swarm.broker)
    monkeypatch.setattr(ingress_module, "AmqpSession", opener)
    nodes = AmqpNodes([ONE, TWO, THREE])
    connected = nodes.connected

    def connected_and_told(url: str) -> None:
        connected(url)
        swarm.changes.notify()

    monkeypatch.setattr(nodes, "connected", connected_and_told)
    swarm.ingress.nodes = nodes
    await swarm.start()
    assert swarm.ingress.node == redact(ONE)
    opener.down = {TWO}
    swarm.broker.connection.lose()
    await swarm.until(lambda: swarm.ingress.node == redact(THREE), "a session on node three")
    assert opener.tried == [ONE, TWO, THREE]
    opener.down = set()
    swarm.broker.connection.lose()
    await swarm.until(lambda: swarm.ingress.node == redact(ONE), "back on node one")
    assert opener.tried == [ONE, TWO, THREE, ONE]
    await swarm.close()
