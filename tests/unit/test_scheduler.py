"""broker.scheduling.scheduler, broker.scheduling.ledger and broker.scheduling.placement:
accounting, waiting, pool choice. Pure."""

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from broker.errors import Rejection
from broker.scheduling.ledger import Ledger
from broker.scheduling.placement import Placement, PlacementRules
from broker.scheduling.scheduler import Scheduler
from broker.settings import Settings
from schemas.task import TaskMessage
from workers.cluster import NodeInfo
from workers.pool import ActorInfo, PoolSpec
from workers.resources import EPSILON, ZERO, ResourceVector


def vec(cpus: float = 0.0, gpus: float = 0.0, memory_mb: int = 0) -> ResourceVector:
    return ResourceVector(cpus, gpus, memory_mb)


def node(
    node_id: str, alive: bool = True, cpus: float = 8, gpus: float = 0, memory_mb: int = 16384
) -> NodeInfo:
    return NodeInfo(node_id, alive, "10.0.0.1", vec(cpus, gpus, memory_mb))


def actor(
    key: str,
    pool: str = "cpu",
    node_id: str = "n1",
    shape: ResourceVector | None = None,
    max_concurrency: int = 4,
) -> ActorInfo:
    return ActorInfo(key, pool, node_id, shape or vec(2, 0, 1024), max_concurrency)


def make_ledger(actors: Iterable[ActorInfo], nodes: Iterable[NodeInfo] = (node("n1"),)) -> Ledger:
    ledger = Ledger()
    ledger.set_nodes(nodes)
    for info in actors:
        ledger.add_actor(info)
    return ledger


def close(a: ResourceVector, b: ResourceVector) -> bool:
    return (
        abs(a.cpus - b.cpus) < EPSILON
        and abs(a.gpus - b.gpus) < EPSILON
        and a.memory_mb == b.memory_mb
    )


# == Ledger ====================================================================================


def test_place_and_finish_accounting() -> None:
    ledger = make_ledger([actor("a")])
    request = vec(0.5, 0, 256)
    assert ledger.place("cpu", request) == actor("a")
    assert ledger.place("cpu", request) == actor("a")
    load = ledger.actors["a"]
    assert load.running == 2
    assert load.used == vec(1.0, 0, 512)
    ledger.finish("a", request)
    assert load.running == 1
    assert load.used == vec(0.5, 0, 256)
    ledger.finish("a", request)
    assert load.running == 0
    assert load.used == ZERO


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (vec(1.5), vec(1)),  # cpus
        (vec(0, 0, 1000), vec(0, 0, 25)),  # memory
        (vec(0, 1), vec(0, 0.5)),  # gpus
    ],
    ids=["cpus", "memory", "gpus"],
)
def test_place_never_exceeds_the_actor_shape(first: ResourceVector, second: ResourceVector) -> None:
    ledger = make_ledger([actor("a", shape=vec(2, 1, 1024), max_concurrency=10)])
    assert ledger.place("cpu", first) is not None
    assert ledger.place("cpu", second) is None
    assert ledger.actors["a"].running == 1
    assert ledger.actors["a"].used == first


def test_request_larger_than_any_actor_is_never_placed() -> None:
    ledger = make_ledger([actor("a", shape=vec(2, 0, 1024))])
    assert ledger.place("cpu", vec(3)) is None
    assert ledger.actors["a"].running == 0


def test_fractional_cpus_fill_an_actor_exactly() -> None:
    ledger = make_ledger([actor("a", shape=vec(1, 0, 0), max_concurrency=100)])
    for _ in range(10):  # 0.1 summed ten times is 0.9999999999999999: must still fit
        assert ledger.place("cpu", vec(0.1)) is not None
    assert ledger.place("cpu", vec(0.1)) is None


def test_max_concurrency_is_respected() -> None:
    ledger = make_ledger([actor("a", max_concurrency=3)])
    for _ in range(3):
        assert ledger.place("cpu", ZERO) is not None
    assert ledger.place("cpu", ZERO) is None
    ledger.finish("a", ZERO)
    assert ledger.place("cpu", ZERO) is not None
    assert ledger.actors["a"].running == 3


def test_place_picks_the_least_loaded_actor() -> None:
    ledger = make_ledger([actor("a"), actor("b")])
    keys = [ledger.place("cpu", vec(0.1)) for _ in range(4)]
    assert sorted(info.key for info in keys if info is not None) == ["a", "a", "b", "b"]
    assert ledger.actors["a"].running == ledger.actors["b"].running == 2


def test_place_stays_within_its_pool() -> None:
    ledger = make_ledger([actor("c", pool="cpu")])
    assert ledger.place("gpu", ZERO) is None
    assert ledger.actors["c"].running == 0


def test_actors_on_dead_or_unknown_nodes_are_not_placed_on() -> None:
    ledger = make_ledger(
        [
            actor("live", node_id="n1", max_concurrency=1),
            actor("dead", node_id="n2", max_concurrency=5),
            actor("unknown", node_id="n3", max_concurrency=5),
        ],
        nodes=[node("n1"), node("n2")],
    )
    gone = ledger.set_nodes([node("n1"), node("n2", alive=False)])
    assert sorted(gone) == ["n2", "n3"]
    placed = ledger.place("cpu", ZERO)
    assert placed is not None and placed.key == "live"
    assert ledger.place("cpu", ZERO) is None  # the others have room, but their nodes are gone
    assert ledger.actors["dead"].running == 0
    assert ledger.actors["unknown"].running == 0

    ledger.set_nodes([node("n1"), node("n2")])  # n2 is back
    placed = ledger.place("cpu", ZERO)
    assert placed is not None and placed.key == "dead"


def test_finish_on_a_removed_actor_is_a_noop() -> None:
    ledger = make_ledger([actor("a"), actor("b")])
    placed = ledger.place("cpu", vec(1))
    assert placed is not None
    ledger.remove_actor(placed.key)
    ledger.finish(placed.key, vec(1))
    assert placed.key not in ledger.actors
    other = next(iter(ledger.actors.values()))
    assert other.running == 0 and other.used == ZERO


def test_pool_view_reports_reserved_used_and_free() -> None:
    ledger = make_ledger([actor("a"), actor("b")])
    ledger.place("cpu", vec(0.5, 0, 100))
    view = ledger.pool_view("cpu")
    assert view["actors"] == 2
    assert view["running"] == 1
    assert view["reserved"] == {"cpus": 4, "gpus": 0, "memory_mb": 2048}
    assert view["used"] == {"cpus": 0.5, "gpus": 0, "memory_mb": 100}
    assert view["free"] == {"cpus": 3.5, "gpus": 0, "memory_mb": 1948}


# == Placement: choosing a pool and checking fit (broker/scheduling/placement.py) ============
# These rules lived on the Scheduler as choose_pool/check_fits; they moved to PlacementRules.


def placement_setup(
    pools: Iterable[str] = ("cpu", "gpu", "memory"),
    nodes: Iterable[NodeInfo] = (node("n1", cpus=16, gpus=4, memory_mb=65536),),
) -> tuple[PlacementRules, dict[str, PoolSpec], Ledger]:
    # Every setting the rules read is given here, so SWARM_* variables cannot change the test.
    settings = Settings(
        gpu_task_types=["training", "inference"],
        gpu_defaults={"training": 1.0, "inference": 0.25, "data_processing": 1.0},
        memory_task_threshold_mb=2048,
        defaults_training={"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
        defaults_inference={"cpus": 0.05, "gpus": 0.0, "memory_mb": 0},
        defaults_data_processing={"cpus": 1.0, "gpus": 0.0, "memory_mb": 0},
        cpu_actor_cpus=1.0,
        gpu_actor_cpus=1.0,
        gpu_actor_gpus=1.0,
        memory_actor_cpus=1.0,
        memory_actor_memory_mb=4096,
    )
    running = {spec.name: spec for spec in settings.pool_specs() if spec.name in set(pools)}
    return PlacementRules(settings), running, make_ledger([], nodes=nodes)


def task_message(**changes: object) -> TaskMessage:
    body = {"v": 1, "id": "t", "type": "data_processing", "handler": "echo", **changes}
    return TaskMessage.model_validate(body)


@pytest.mark.parametrize(
    ("changes", "pools", "expected"),
    [
        pytest.param({}, ("cpu", "gpu", "memory"), Placement("cpu", vec(1)), id="default-cpu"),
        pytest.param(
            {"pool": "memory"}, ("cpu", "memory"), Placement("memory", vec(1)), id="pinned"
        ),
        pytest.param(
            {"type": "training", "pool": "cpu"},
            ("cpu", "gpu"),
            Placement("cpu", vec(1)),
            id="pin-beats-gpu-type",
        ),
        pytest.param(
            {"resources": {"gpus": 0.5}},
            ("cpu", "gpu"),
            Placement("gpu", vec(1, 0.5)),
            id="gpus-go-to-gpu",
        ),
        pytest.param(
            {"type": "training"}, ("cpu", "gpu"), Placement("gpu", vec(1, 1)), id="gpu-type"
        ),
        pytest.param(
            {"type": "inference"},
            ("cpu", "gpu"),
            Placement("gpu", vec(0.05, 0.25)),
            id="gpu-type-takes-its-share",
        ),
        pytest.param(
            {"type": "training"}, ("cpu",), Placement("cpu", vec(1)), id="gpu-type-no-gpu-pool"
        ),
        pytest.param(
            {"resources": {"memory_mb": 4096}},
            ("cpu", "memory"),
            Placement("memory", vec(1, 0, 4096)),
            id="big-memory",
        ),
    ],
)
def test_placement_chooses_the_pool(
    changes: dict[str, object], pools: tuple[str, ...], expected: Placement
) -> None:
    rules, running, ledger = placement_setup(pools)
    assert rules.place(task_message(**changes), running, ledger) == expected


@pytest.mark.parametrize(
    ("changes", "pools", "says"),
    [
        pytest.param({"pool": "memory"}, ("cpu", "gpu"), "'memory' pool", id="pinned-not-running"),
        pytest.param({"resources": {"gpus": 1}}, ("cpu",), "'gpu' pool", id="gpu-not-running"),
        pytest.param({"pool": "cpu"}, (), "'cpu' pool", id="nothing-running"),
        pytest.param({"resources": {"cpus": 32}}, ("cpu",), "no node", id="bigger-than-a-node"),
        pytest.param(
            {"resources": {"gpus": 8}}, ("cpu", "gpu"), "no node", id="more-gpus-than-a-node"
        ),
        pytest.param({"resources": {"cpus": 2}}, ("cpu",), "'cpu' actor", id="bigger-than-actor"),
        pytest.param(
            {"resources": {"gpus": 2}}, ("cpu", "gpu"), "'gpu' actor", id="more-gpus-than-actor"
        ),
    ],
)
def test_placement_unsatisfiable(
    changes: dict[str, object], pools: tuple[str, ...], says: str
) -> None:
    rules, running, ledger = placement_setup(pools)
    rejection = rules.place(task_message(**changes), running, ledger)
    assert isinstance(rejection, Rejection)
    assert rejection.code == "unsatisfiable"
    assert says in rejection.message
    assert not rejection.retryable


def test_placement_counts_only_alive_nodes() -> None:
    rules, running, ledger = placement_setup(
        ("cpu",), nodes=[node("small", cpus=4), node("big-but-dead", alive=False, cpus=64)]
    )
    rejection = rules.place(task_message(resources={"cpus": 8}), running, ledger)
    assert isinstance(rejection, Rejection) and rejection.code == "unsatisfiable"
    assert "no node" in rejection.message


def test_placement_with_no_known_node_is_unsatisfiable() -> None:
    rules, running, ledger = placement_setup(("cpu",), nodes=[])
    rejection = rules.place(task_message(), running, ledger)
    assert isinstance(rejection, Rejection) and rejection.code == "unsatisfiable"


def test_placement_small_memory_request_runs_on_the_cpu_pool() -> None:
    rules, running, ledger = placement_setup(("cpu", "gpu", "memory"))
    placed = rules.place(task_message(resources={"memory_mb": 512}), running, ledger)
    assert isinstance(placed, Placement) and placed.pool == "cpu"


# == Scheduler: waiting =========================================================================


async def next_done(pending: set[asyncio.Task[ActorInfo]]) -> asyncio.Task[ActorInfo]:
    """The one task of `pending` that completes next (fails if none does, or several do)."""
    done, _ = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, f"expected exactly one placement, got {len(done)}"
    (task,) = done
    pending.discard(task)
    return task


async def queued(scheduler: Scheduler, pool: str, count: int) -> None:
    """Let freshly created acquire tasks run up to their wait; check they did."""
    await asyncio.sleep(0)
    assert scheduler.waiting(pool) == count


async def cancel_all(tasks: Iterable[asyncio.Task[ActorInfo]]) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_acquire_places_at_once_when_there_is_room() -> None:
    scheduler = Scheduler(make_ledger([actor("a")]))
    placed = await scheduler.acquire("cpu", vec(1), priority=0)
    assert placed.key == "a"
    assert scheduler.ledger.actors["a"].running == 1
    assert scheduler.waiting("cpu") == 0


async def test_acquire_waits_when_full_and_release_wakes_it() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    first = await scheduler.acquire("cpu", vec(1), 0)
    waiter = asyncio.create_task(scheduler.acquire("cpu", vec(1), 0))
    await queued(scheduler, "cpu", 1)
    assert not waiter.done()

    scheduler.release("cpu", first, vec(1))
    assert (await next_done({waiter})).result().key == "a"
    assert scheduler.waiting("cpu") == 0
    assert scheduler.ledger.actors["a"].running == 1
    assert scheduler.ledger.actors["a"].used == vec(1)


async def test_waiters_are_woken_by_priority_then_arrival() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    holder = await scheduler.acquire("cpu", ZERO, 0)
    order = [("low-1", 1), ("high-1", 5), ("zero", 0), ("high-2", 5), ("low-2", 1), ("top", 9)]
    tasks: dict[asyncio.Task[ActorInfo], str] = {}
    for name, priority in order:
        tasks[asyncio.create_task(scheduler.acquire("cpu", ZERO, priority))] = name
    await queued(scheduler, "cpu", len(order))

    pending = set(tasks)
    woken = []
    current = holder
    while pending:
        scheduler.release("cpu", current, ZERO)
        task = await next_done(pending)
        woken.append(tasks[task])
        current = task.result()
    assert woken == ["top", "high-1", "high-2", "low-1", "low-2", "zero"]
    scheduler.release("cpu", current, ZERO)
    assert scheduler.ledger.actors["a"].running == 0


async def test_new_arrivals_queue_behind_waiters() -> None:
    """A newcomer's arrival offers freed room to the queue in order: the earlier waiter of
    equal priority gets it, not the newcomer."""
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    holder = await scheduler.acquire("cpu", ZERO, 0)
    early = asyncio.create_task(scheduler.acquire("cpu", ZERO, 3))
    await queued(scheduler, "cpu", 1)
    scheduler.ledger.finish(holder.key, ZERO)  # room frees without a wake
    late = asyncio.create_task(scheduler.acquire("cpu", ZERO, 3))
    assert await next_done({early, late}) is early
    assert scheduler.waiting("cpu") == 1
    await cancel_all([late])


async def test_a_small_newcomer_backfills_room_a_big_waiter_cannot_use() -> None:
    scheduler = Scheduler(make_ledger([actor("a", shape=vec(4), max_concurrency=10)]))
    await scheduler.acquire("cpu", vec(3), 0)
    big = asyncio.create_task(scheduler.acquire("cpu", vec(4), 9))
    await queued(scheduler, "cpu", 1)
    small = await asyncio.wait_for(scheduler.acquire("cpu", vec(1), 0), 5)
    assert small.key == "a"
    assert not big.done()
    await cancel_all([big])


async def test_a_large_waiter_does_not_block_a_small_one() -> None:
    scheduler = Scheduler(make_ledger([actor("a", shape=vec(4), max_concurrency=10)]))
    first = await scheduler.acquire("cpu", vec(2), 0)
    second = await scheduler.acquire("cpu", vec(2), 0)
    big = asyncio.create_task(scheduler.acquire("cpu", vec(4), 9))
    small = asyncio.create_task(scheduler.acquire("cpu", vec(2), 0))
    await queued(scheduler, "cpu", 2)

    scheduler.release("cpu", first, vec(2))  # 2 free: the big one does not fit, the small one does
    assert await next_done({big, small}) is small
    assert not big.done()
    scheduler.release("cpu", second, vec(2))
    scheduler.release("cpu", small.result(), vec(2))
    assert await next_done({big}) is big
    assert scheduler.ledger.actors["a"].used == vec(4)


async def test_cancelled_waiter_leaks_no_capacity() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    holder = await scheduler.acquire("cpu", vec(1), 0)
    gone = asyncio.create_task(scheduler.acquire("cpu", vec(1), 9))
    stays = asyncio.create_task(scheduler.acquire("cpu", vec(1), 0))
    await queued(scheduler, "cpu", 2)

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert scheduler.waiting("cpu") == 1

    scheduler.release("cpu", holder, vec(1))
    assert await next_done({stays}) is stays
    scheduler.release("cpu", stays.result(), vec(1))
    load = scheduler.ledger.actors["a"]
    assert load.running == 0 and load.used == ZERO
    assert scheduler.waiting("cpu") == 0


async def test_waiter_cancelled_in_the_tick_it_was_placed_gives_the_room_back() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    holder = await scheduler.acquire("cpu", vec(1), 0)
    waiter = asyncio.create_task(scheduler.acquire("cpu", vec(1), 0))
    await queued(scheduler, "cpu", 1)

    scheduler.release("cpu", holder, vec(1))  # places the waiter: its future now has a result
    assert scheduler.ledger.actors["a"].running == 1
    waiter.cancel()  # ...but the task is cancelled before it could resume
    with pytest.raises(asyncio.CancelledError):
        await waiter
    load = scheduler.ledger.actors["a"]
    assert load.running == 0 and load.used == ZERO
    # and the room is really usable again
    assert (await scheduler.acquire("cpu", vec(1), 0)).key == "a"


async def test_cancelled_waiter_room_goes_to_the_next_waiter() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    holder = await scheduler.acquire("cpu", ZERO, 0)
    first = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0))
    second = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0))
    await queued(scheduler, "cpu", 2)

    scheduler.release("cpu", holder, ZERO)  # first is placed...
    first.cancel()  # ...and cancelled in the same tick: its room must pass to second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await next_done({second}) is second
    assert scheduler.ledger.actors["a"].running == 1
    scheduler.release("cpu", second.result(), ZERO)


async def test_wake_after_an_actor_is_added() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    await scheduler.acquire("cpu", ZERO, 0)
    waiter = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0))
    await queued(scheduler, "cpu", 1)
    scheduler.ledger.add_actor(actor("b"))
    scheduler.wake("cpu")
    assert (await next_done({waiter})).result().key == "b"


async def test_acquire_does_not_place_on_a_dead_node() -> None:
    ledger = make_ledger(
        [actor("on-n1", node_id="n1", max_concurrency=1), actor("on-n2", node_id="n2")],
        nodes=[node("n1"), node("n2")],
    )
    scheduler = Scheduler(ledger)
    assert ledger.set_nodes([node("n1"), node("n2", alive=False)]) == ["n2"]
    first = await scheduler.acquire("cpu", ZERO, 0)
    assert first.key == "on-n1"
    waiter = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0))
    await queued(scheduler, "cpu", 1)  # on-n2 has room, but its node is dead
    assert not waiter.done()
    scheduler.release("cpu", first, ZERO)
    assert (await next_done({waiter})).result().key == "on-n1"
    assert ledger.actors["on-n2"].running == 0


async def test_pools_wait_independently() -> None:
    scheduler = Scheduler(
        make_ledger([actor("c", pool="cpu", max_concurrency=1), actor("g", pool="gpu")])
    )
    await scheduler.acquire("cpu", ZERO, 0)
    cpu_waiter = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0))
    await queued(scheduler, "cpu", 1)
    placed = await scheduler.acquire("gpu", ZERO, 0)  # not held up by the cpu queue
    assert placed.key == "g"
    assert scheduler.waiting("gpu") == 0
    await cancel_all([cpu_waiter])
    assert scheduler.waiting("cpu") == 0


async def test_waiting_per_tag_is_counted_and_never_leaks() -> None:
    scheduler = Scheduler(make_ledger([actor("a", max_concurrency=1)]))
    seen: list[tuple[str, int]] = []
    pools_waiting: list[str] = []
    scheduler.on_tag_waiting = lambda tag, count: seen.append((tag, count))
    scheduler.on_pool_waiting = pools_waiting.append

    holder = await scheduler.acquire("cpu", ZERO, 0, tag="q1")
    assert scheduler.waiting_by_tag("q1") == 0  # placed at once: never waited
    placed = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0, tag="q1"))
    cancelled = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0, tag="q1"))
    other = asyncio.create_task(scheduler.acquire("cpu", ZERO, 0, tag="q2"))
    await queued(scheduler, "cpu", 3)
    assert scheduler.waiting_by_tag("q1") == 2
    assert scheduler.waiting_by_tag("q2") == 1
    assert pools_waiting == ["cpu", "cpu", "cpu"]

    await cancel_all([cancelled])
    assert scheduler.waiting_by_tag("q1") == 1
    scheduler.release("cpu", holder, ZERO)
    assert await next_done({placed}) is placed
    assert scheduler.waiting_by_tag("q1") == 0
    await cancel_all([other])
    assert scheduler.waiting_by_tag("q2") == 0
    assert seen[-1] == ("q2", 0)
    assert [count for tag, count in seen if tag == "q1"] == [1, 2, 1, 0]
    scheduler.release("cpu", placed.result(), ZERO)
    assert scheduler.ledger.actors["a"].running == 0


# == Ledger: random sequences ===================================================================

POOLS = ("cpu", "gpu")
NODES = ("n1", "n2", "n3", "never-reported")
shapes = st.builds(
    ResourceVector,
    cpus=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    gpus=st.sampled_from([0.0, 1.0]),
    memory_mb=st.sampled_from([0, 512, 1024]),
)
requests = st.builds(
    ResourceVector,
    cpus=st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 1.0, 1.5, 3.0]),
    gpus=st.sampled_from([0.0, 0.0, 0.5, 1.0]),
    memory_mb=st.sampled_from([0, 0, 100, 256, 700]),
)


class LedgerMachine(RuleBasedStateMachine):
    """Drives a Ledger at random and checks it against a plain model of outstanding tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.alive = {"n1": True, "n2": True, "n3": True}
        self.ledger.set_nodes(self._nodes())
        self.serial = 0
        self.outstanding: list[tuple[str, ResourceVector]] = []  # placed, not finished
        self.orphans: list[tuple[str, ResourceVector]] = []  # placed on actors since removed

    def _nodes(self) -> list[NodeInfo]:
        return [node(n, alive) for n, alive in self.alive.items()]

    def _model(self, key: str) -> tuple[ResourceVector, int]:
        mine = [request for k, request in self.outstanding if k == key]
        return sum(mine, ZERO), len(mine)

    @initialize(
        actors=st.lists(
            st.tuples(st.sampled_from(POOLS), shapes, st.integers(1, 3)), min_size=1, max_size=3
        )
    )
    def some_actors(self, actors: list[tuple[str, ResourceVector, int]]) -> None:
        for pool, shape, max_concurrency in actors:
            self.add_actor(pool, "n1", shape, max_concurrency)

    @rule(
        pool=st.sampled_from(POOLS),
        node_id=st.sampled_from(NODES),
        shape=shapes,
        max_concurrency=st.integers(1, 4),
    )
    def add_actor(
        self, pool: str, node_id: str, shape: ResourceVector, max_concurrency: int
    ) -> None:
        self.serial += 1
        self.ledger.add_actor(ActorInfo(f"a{self.serial}", pool, node_id, shape, max_concurrency))

    @precondition(lambda self: bool(self.ledger.actors))
    @rule(data=st.data())
    def remove_actor(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.ledger.actors)))
        self.ledger.remove_actor(key)
        self.orphans += [item for item in self.outstanding if item[0] == key]
        self.outstanding = [item for item in self.outstanding if item[0] != key]

    @rule(node_id=st.sampled_from(tuple(NODES[:3])), alive=st.booleans())
    def set_node(self, node_id: str, alive: bool) -> None:
        self.alive[node_id] = alive
        gone = self.ledger.set_nodes(self._nodes())
        assert set(gone) == {
            load.info.node_id
            for load in self.ledger.actors.values()
            if not self.alive.get(load.info.node_id, False)
        }

    @rule(pool=st.sampled_from(POOLS), batch=st.lists(requests, min_size=1, max_size=6))
    def place_several(self, pool: str, batch: list[ResourceVector]) -> None:
        for request in batch:
            self.place(pool, request)

    @rule(pool=st.sampled_from(POOLS), request=requests)
    def place(self, pool: str, request: ResourceVector) -> None:
        # Which actors have room, by the model (not by the ledger's own bookkeeping).
        room: dict[str, int] = {}
        for key, load in self.ledger.actors.items():
            info = load.info
            used, running = self._model(key)
            if (
                info.pool == pool
                and self.alive.get(info.node_id, False)
                and running < info.max_concurrency
                and (used + request).fits_in(info.shape)
            ):
                room[key] = running
        placed = self.ledger.place(pool, request)
        if not room:
            assert placed is None
            return
        assert placed is not None, f"room on {sorted(room)} but nothing placed"
        assert placed.key in room
        assert room[placed.key] == min(room.values()), "not the least-loaded actor"
        self.outstanding.append((placed.key, request))

    @precondition(lambda self: bool(self.outstanding))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.outstanding) - 1))
        key, request = self.outstanding.pop(index)
        self.ledger.finish(key, request)

    @precondition(lambda self: bool(self.orphans))
    @rule()
    def finish_on_removed_actor(self) -> None:
        key, request = self.orphans.pop()
        self.ledger.finish(key, request)  # a no-op; the invariants check nothing else moved

    @rule()
    def finish_everything(self) -> None:
        for key, request in self.outstanding:
            self.ledger.finish(key, request)
        self.outstanding.clear()
        self._assert_idle()

    @invariant()
    def within_shape_and_concurrency(self) -> None:
        for key, load in self.ledger.actors.items():
            assert 0 <= load.running <= load.info.max_concurrency
            assert load.used.fits_in(load.info.shape), f"{key} uses {load.used} > {load.info}"
            assert load.used.cpus >= -EPSILON and load.used.gpus >= -EPSILON
            assert load.used.memory_mb >= 0
            used, running = self._model(key)
            assert load.running == running
            assert close(load.used, used)

    def _assert_idle(self) -> None:
        for load in self.ledger.actors.values():
            assert load.running == 0
            assert close(load.used, ZERO)

    def teardown(self) -> None:
        for key, request in self.outstanding:
            self.ledger.finish(key, request)
        self.outstanding.clear()
        self._assert_idle()


LedgerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase


# == Scheduler: random sequences ================================================================


@dataclass(eq=False)
class ModelWaiter:
    """A task the model knows to be waiting in the scheduler for room."""

    pool: str
    request: ResourceVector
    priority: int
    arrival: int
    tag: str
    task: "asyncio.Task[ActorInfo]"

    def ahead_of(self, other: "ModelWaiter") -> bool:
        """Served before `other` by the scheduler's rule: higher priority, then earlier."""
        return (-self.priority, self.arrival) < (-other.priority, other.arrival)


TAGS = ("q1", "q2")


class SchedulerMachine(RuleBasedStateMachine):
    """Drives the Scheduler itself (acquire, release, cancel, actors added, nodes lost and
    back) on its own event loop, and checks after every step that:
    - the ledger never over-commits, and holds exactly what the placed tasks were given;
    - no task waits while there is room for it (the scheduler is work-conserving);
    - no task was placed past one ahead of it in service order that asked no more than it
      did (priority, then arrival; a larger one ahead may be passed: backfill);
    - the waiting counts per pool and per tag are exact;
    - and, when capacity returns (every node up, every task done), every waiter is served.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.alive = {"n1": True, "n2": True}
        self.ledger = Ledger()
        self.ledger.set_nodes(self._nodes())
        self.scheduler = Scheduler(self.ledger)
        self.serial = 0
        self.arrivals = 0
        self.holding: list[tuple[str, ActorInfo, ResourceVector]] = []
        self.waiters: list[ModelWaiter] = []
        self.placed_now: list[ModelWaiter] = []

    def _nodes(self) -> list[NodeInfo]:
        return [node(n, alive) for n, alive in self.alive.items()]

    # -- running the loop --------------------------------------------------------------------
    def _settle(self) -> None:
        """Run the loop until every task it can advance has (each rule needs two turns at
        most: one for the acquire or cancel, one for a waiter placed by it), then take the
        placed and cancelled waiters out of the model."""

        async def turns() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        self.loop.run_until_complete(turns())
        self.placed_now = []
        still: list[ModelWaiter] = []
        for waiter in self.waiters:
            if not waiter.task.done():
                still.append(waiter)
            elif not waiter.task.cancelled():
                self.holding.append((waiter.pool, waiter.task.result(), waiter.request))
                self.placed_now.append(waiter)
        self.waiters = still

    def _fits_some_actor(self, pool: str, request: ResourceVector) -> bool:
        return any(
            load.info.pool == pool and request.fits_in(load.info.shape)
            for load in self.ledger.actors.values()
        )

    # -- rules -------------------------------------------------------------------------------
    @initialize(
        actors=st.lists(
            st.tuples(st.sampled_from(POOLS), shapes, st.integers(1, 3)), min_size=2, max_size=4
        )
    )
    def some_actors(self, actors: list[tuple[str, ResourceVector, int]]) -> None:
        for n, (pool, shape, max_concurrency) in enumerate(actors):
            self._add(pool, ("n1", "n2")[n % 2], shape, max_concurrency)

    def _add(self, pool: str, node_id: str, shape: ResourceVector, max_concurrency: int) -> None:
        self.serial += 1
        self.ledger.add_actor(ActorInfo(f"a{self.serial}", pool, node_id, shape, max_concurrency))

    @rule(
        pool=st.sampled_from(POOLS),
        node_id=st.sampled_from(("n1", "n2")),
        shape=shapes,
        max_concurrency=st.integers(1, 3),
    )
    def add_actor(
        self, pool: str, node_id: str, shape: ResourceVector, max_concurrency: int
    ) -> None:
        self._add(pool, node_id, shape, max_concurrency)
        self.scheduler.wake(pool)  # as PoolSet does once an actor has started
        self._settle()

    @rule(
        pool=st.sampled_from(POOLS),
        request=requests,
        priority=st.integers(0, 3),
        tag=st.sampled_from(TAGS),
    )
    def acquire(self, pool: str, request: ResourceVector, priority: int, tag: str) -> None:
        # Placement (broker/scheduling/placement.py) refuses what no actor of the pool could
        # ever hold.
        assume(self._fits_some_actor(pool, request))
        self.arrivals += 1
        task = self.loop.create_task(self.scheduler.acquire(pool, request, priority, tag))
        self.waiters.append(ModelWaiter(pool, request, priority, self.arrivals, tag, task))
        self._settle()

    @precondition(lambda self: bool(self.holding))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.holding) - 1))
        pool, info, request = self.holding.pop(index)
        self.scheduler.release(pool, info, request)
        self._settle()

    @precondition(lambda self: bool(self.waiters))
    @rule(data=st.data(), release_first=st.booleans())
    def cancel(self, data: st.DataObject, release_first: bool) -> None:
        """A waiting task is cancelled; with `release_first`, in the same tick as room is
        released (the waiter may have been placed already: its room must not leak)."""
        waiter = data.draw(st.sampled_from(self.waiters))
        if release_first and self.holding:
            pool, info, request = self.holding.pop(0)
            self.scheduler.release(pool, info, request)
        waiter.task.cancel()
        self._settle()
        assert waiter.task.cancelled()

    @precondition(lambda self: bool(self.holding) and bool(self.waiters))
    @rule(data=st.data())
    def release_then_cancel_the_pools_waiters(self, data: st.DataObject) -> None:
        """Room is released and, in the same tick, every task waiting in that pool is
        cancelled: whichever the release placed gives its room back, none is lost."""
        pool, info, request = self.holding.pop(data.draw(st.integers(0, len(self.holding) - 1)))
        self.scheduler.release(pool, info, request)
        cancelled = [w for w in self.waiters if w.pool == pool]
        for waiter in cancelled:
            waiter.task.cancel()
        self._settle()
        assert all(w.task.cancelled() for w in cancelled)

    @rule(node_id=st.sampled_from(("n1", "n2")), alive=st.booleans())
    def set_node(self, node_id: str, alive: bool) -> None:
        self.alive[node_id] = alive
        self.ledger.set_nodes(self._nodes())
        for pool in POOLS:  # as PoolSet.refresh_nodes does
            self.scheduler.wake(pool)
        self._settle()

    @rule()
    def capacity_returns(self) -> None:
        """Every node back, then every task done as soon as it is placed: each waiter must
        be served, one release after another."""
        self.alive = dict.fromkeys(self.alive, True)
        self.ledger.set_nodes(self._nodes())
        for pool in POOLS:
            self.scheduler.wake(pool)
        self._settle()
        rounds = len(self.waiters) + 1
        for _ in range(rounds):
            if not self.waiters and not self.holding:
                break
            while self.holding:
                pool, info, request = self.holding.pop()
                self.scheduler.release(pool, info, request)
            self._settle()
        assert self.waiters == [], f"{len(self.waiters)} waiters never served"
        for pool in POOLS:
            assert self.scheduler.waiting(pool) == 0

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def never_over_committed(self) -> None:
        for key, load in self.ledger.actors.items():
            assert 0 <= load.running <= load.info.max_concurrency
            assert load.used.fits_in(load.info.shape), f"{key} uses {load.used}"
            mine = [request for _, info, request in self.holding if info.key == key]
            assert load.running == len(mine)
            assert close(load.used, sum(mine, ZERO))

    @invariant()
    def no_task_waits_while_there_is_room(self) -> None:
        for waiter in self.waiters:
            room = [
                load.info.key
                for load in self.ledger.actors.values()
                if load.info.pool == waiter.pool
                and self.alive.get(load.info.node_id, False)
                and load.has_room_for(waiter.request)
            ]
            assert not room, f"{waiter.request} waits in {waiter.pool} with room on {room}"

    @invariant()
    def no_task_is_passed_by_one_asking_at_least_as_much(self) -> None:
        for placed in self.placed_now:
            for waiting in self.waiters:
                if waiting.pool == placed.pool and waiting.ahead_of(placed):
                    assert not waiting.request.fits_in(placed.request), (
                        f"{placed.request} (priority {placed.priority}) placed before "
                        f"{waiting.request} (priority {waiting.priority}), ahead of it"
                    )

    @invariant()
    def waiting_counts_are_exact(self) -> None:
        for pool in POOLS:
            assert self.scheduler.waiting(pool) == sum(w.pool == pool for w in self.waiters)
        for tag in TAGS:
            assert self.scheduler.waiting_by_tag(tag) == sum(w.tag == tag for w in self.waiters)

    def teardown(self) -> None:
        try:
            self.capacity_returns()
        finally:
            for waiter in self.waiters:
                waiter.task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
TestSchedulerMachine = SchedulerMachine.TestCase


async def test_a_small_newcomer_still_backfills_after_waiters_of_its_pool_were_cancelled() -> None:
    """A wake stops at the first waiter that does not fit only while every waiter asks the
    same: the count of distinct requests must survive cancellations (a lost count would
    stop a wake at the big waiter, in front of a small one that fits)."""
    scheduler = Scheduler(make_ledger([actor("a", shape=vec(4), max_concurrency=10)]))
    holder = await scheduler.acquire("cpu", vec(3), 0)
    bigs = [asyncio.create_task(scheduler.acquire("cpu", vec(4), 9)) for _ in range(3)]
    await queued(scheduler, "cpu", 3)
    await cancel_all(bigs[:2])
    small = await asyncio.wait_for(scheduler.acquire("cpu", vec(1), 0), 5)
    assert small.key == "a" and not bigs[2].done()
    scheduler.release("cpu", small, vec(1))
    scheduler.release("cpu", holder, vec(3))
    assert (await next_done({bigs[2]})).result().key == "a"
    assert scheduler.waiting("cpu") == 0
