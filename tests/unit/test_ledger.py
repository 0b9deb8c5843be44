"""broker.scheduling.ledger beyond placing and finishing (tests/unit/test_scheduler.py has
those): actors drained before they stop, idle actors, and room on the cluster's nodes for one more
actor."""

import pytest
from fakes.sync import FakeClock

import broker.scheduling.ledger
from broker.scheduling.ledger import Ledger
from workers.cluster import NodeInfo
from workers.pool import ActorInfo
from workers.resources import ResourceVector

MEMORY_MARK = {"swarm_memory_node": 0.001}


def vec(cpus: float = 0.0, gpus: float = 0.0, memory_mb: int = 0) -> ResourceVector:
    return ResourceVector(cpus, gpus, memory_mb)


def node(
    node_id: str,
    cpus: float = 8,
    gpus: float = 0,
    memory_mb: int = 16384,
    alive: bool = True,
    custom: dict[str, float] | None = None,
) -> NodeInfo:
    return NodeInfo(node_id, alive, "10.0.0.1", vec(cpus, gpus, memory_mb), custom or {})


def actor(key: str, pool: str = "cpu", node_id: str = "n1", cpus: float = 2) -> ActorInfo:
    return ActorInfo(key, pool, node_id, vec(cpus, 0, 1024), 4)


def ledger_of(*actors: ActorInfo, nodes: tuple[NodeInfo, ...] = (node("n1"),)) -> Ledger:
    ledger = Ledger()
    ledger.set_nodes(nodes)
    for info in actors:
        ledger.add_actor(info)
    return ledger


# == Draining ===================================================================================


def test_a_draining_actor_takes_no_new_task_and_is_drained_when_its_last_task_ends() -> None:
    ledger = ledger_of(actor("a"), actor("b"))
    request = vec(0.5)
    assert ledger.place("cpu", request) is not None  # one each: a, then b
    assert ledger.place("cpu", request) is not None
    assert ledger.place("cpu", request) is not None  # a again: a runs 2, b runs 1
    assert ledger.actors["a"].running == 2

    ledger.drain("a")
    for _ in range(3):  # all to b, though a is the less loaded from the second on
        placed = ledger.place("cpu", request)
        assert placed is not None and placed.key == "b"
    assert ledger.place("cpu", request) is None  # b is full; a still has room, but drains
    assert ledger.drained() == []
    ledger.finish("a", request)
    assert ledger.drained() == []  # one task still runs on it
    ledger.finish("a", request)
    assert ledger.drained() == ["a"]


def test_draining_an_actor_the_ledger_does_not_know_changes_nothing() -> None:
    ledger = ledger_of(actor("a"))
    ledger.drain("gone")
    assert ledger.drained() == []
    assert ledger.place("cpu", vec(1)) is not None


# == Idle actors ================================================================================


def test_idle_actors_are_the_pools_actors_that_ran_nothing_for_long_enough() -> None:
    ledger = ledger_of(actor("busy"), actor("idle"), actor("other", pool="gpu"))
    since = max(load.idle_since_s for load in ledger.actors.values())
    placed = ledger.place("cpu", vec(0.5))  # ties go to the first actor
    assert placed is not None and placed.key == "busy"

    assert ledger.idle_actors("cpu", 10.0, now_s=since + 9.9) == []
    assert ledger.idle_actors("cpu", 10.0, now_s=since + 10.0) == ["idle"]
    assert ledger.idle_actors("gpu", 10.0, now_s=since + 10.0) == ["other"]


def test_an_actor_is_idle_from_when_its_last_task_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(1000.0)
    monkeypatch.setattr(broker.scheduling.ledger, "time", clock)
    ledger = ledger_of(actor("a"))
    request = vec(0.5)
    ledger.place("cpu", request)
    ledger.place("cpu", request)
    clock.advance(100)
    ledger.finish("a", request)  # one still runs: not idle, however long ago it started
    assert ledger.idle_actors("cpu", 10.0, now_s=clock.now_s + 500) == []
    clock.advance(100)
    ledger.finish("a", request)
    assert ledger.idle_actors("cpu", 10.0, now_s=clock.now_s + 9) == []
    assert ledger.idle_actors("cpu", 10.0, now_s=clock.now_s + 10) == ["a"]


# == Room for one more actor ====================================================================


def test_room_for_an_actor_counts_what_our_actors_reserve_on_each_node() -> None:
    ledger = ledger_of(actor("a"), actor("b"), actor("c"), nodes=(node("n1", cpus=8),))
    # 6 of n1's 8 CPUs are reserved, whatever the actors run.
    assert ledger.room_for_actor(vec(2), {})
    assert not ledger.room_for_actor(vec(3), {})
    ledger.remove_actor("c")
    assert ledger.room_for_actor(vec(3), {})
    ledger.set_nodes([node("n1", cpus=8), node("n2", cpus=4)])
    assert ledger.room_for_actor(vec(4), {})
    assert not ledger.room_for_actor(vec(5), {})


def test_room_for_an_actor_needs_its_custom_resources_on_the_node_with_room() -> None:
    ledger = ledger_of(
        nodes=(node("big", cpus=32), node("marked", cpus=2, custom={"swarm_memory_node": 1.0}))
    )
    assert ledger.room_for_actor(vec(2), MEMORY_MARK)
    assert not ledger.room_for_actor(vec(4), MEMORY_MARK)  # only the unmarked node has room
    assert ledger.room_for_actor(vec(4), {})
    ledger.add_actor(actor("m", pool="memory", node_id="marked", cpus=2))
    assert not ledger.room_for_actor(vec(2), MEMORY_MARK)  # the marked node is full


def test_room_for_an_actor_is_never_on_a_dead_node() -> None:
    ledger = ledger_of(nodes=(node("n1", cpus=2), node("n2", cpus=16, alive=False)))
    assert not ledger.room_for_actor(vec(4), {})
    assert not ledger.could_host(vec(4), {})
    ledger.set_nodes([node("n1", cpus=2), node("n2", cpus=16)])
    assert ledger.room_for_actor(vec(4), {})
    assert ledger.could_host(vec(4), {})


def test_could_host_counts_nothing_reserved_but_needs_size_and_custom_resources() -> None:
    ledger = ledger_of(
        *(actor(f"a{n}") for n in range(4)),
        nodes=(node("n1", cpus=8), node("marked", cpus=2, custom={"swarm_memory_node": 1.0})),
    )
    assert not ledger.room_for_actor(vec(4), {})  # n1 is fully reserved
    assert ledger.could_host(vec(4), {})  # but it could hold one, counting nothing used
    assert not ledger.could_host(vec(4), MEMORY_MARK)  # the marked node is too small
    assert ledger.could_host(vec(2), MEMORY_MARK)
    assert not ledger.could_host(vec(1, gpus=1), {})  # no node has a GPU
    assert not ledger.could_host(vec(9), {})
