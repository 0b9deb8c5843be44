"""The ledger's index of actors with room (broker/scheduling/room_index.py) against a
brute-force scan of every actor: after any sequence of actors added and removed, tasks placed
and finished, actors drained and nodes lost or back, the indexed ledger places each task on
exactly the actor the scan picks (the least loaded with room, ties to the first added), or on
none when the scan finds none, and never past an actor's shape or concurrency."""

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from broker.scheduling.ledger import Ledger
from broker.scheduling.room_index import RoomIndex
from workers.cluster import NodeInfo
from workers.pool import ActorInfo
from workers.resources import EPSILON, ZERO, ResourceVector

POOLS = ("cpu", "gpu")
NODES = ("n1", "n2", "n3", "n4")  # n4 is never in the node table: its actors are never placed on
KEYS = tuple(f"a{i}" for i in range(8))  # few keys, so that one comes back after removal


def vec(cpus: float = 0.0, gpus: float = 0.0, memory_mb: int = 0) -> ResourceVector:
    return ResourceVector(cpus, gpus, memory_mb)


def node(node_id: str, alive: bool = True) -> NodeInfo:
    return NodeInfo(node_id, alive, "10.0.0.1", vec(16, 4, 65536))


# == The brute force: the ledger's rule, by a scan of every actor =================================


@dataclass
class _Load:
    info: ActorInfo
    used: ResourceVector = ZERO
    running: int = 0
    draining: bool = False


@dataclass
class ScanLedger:
    alive: set[str] = field(default_factory=set)
    actors: dict[str, _Load] = field(default_factory=dict)

    def add(self, info: ActorInfo) -> None:
        self.actors[info.key] = _Load(info)  # a key seen before keeps its place in the order

    def place(self, pool: str, request: ResourceVector) -> str | None:
        best: _Load | None = None
        for load in self.actors.values():
            if load.info.pool != pool or load.draining or load.info.node_id not in self.alive:
                continue
            fits = load.running < load.info.max_concurrency and (load.used + request).fits_in(
                load.info.shape
            )
            if fits and (best is None or load.running < best.running):
                best = load
        if best is None:
            return None
        best.used = best.used + request
        best.running += 1
        return best.info.key

    def finish(self, key: str, request: ResourceVector) -> None:
        load = self.actors.get(key)
        if load is not None:
            load.used = load.used - request
            load.running -= 1


shapes = st.sampled_from([vec(1), vec(2, 0, 1024), vec(1, 1), vec(4, 1, 2048)])
requests = st.sampled_from(
    [ZERO, vec(0.1), vec(0.25), vec(0.5), vec(1), vec(0.05, 0.25), vec(1, 1), vec(0.5, 0, 512)]
)


class IndexAgainstScan(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.scan = ScanLedger()
        self.alive = {"n1": True, "n2": True, "n3": True}
        self._set_nodes()
        self.running: list[tuple[str, ResourceVector]] = []  # placed, not finished

    def _set_nodes(self) -> None:
        self.ledger.set_nodes([node(n, alive) for n, alive in self.alive.items()])
        self.scan.alive = {n for n, alive in self.alive.items() if alive}

    @initialize(
        actors=st.lists(
            st.tuples(st.sampled_from(POOLS), shapes, st.integers(1, 5)), min_size=1, max_size=4
        )
    )
    def some_actors(self, actors: list[tuple[str, ResourceVector, int]]) -> None:
        for key, (pool, shape, max_concurrency) in zip(KEYS, actors, strict=False):
            self.add_actor(key, pool, "n1", shape, max_concurrency)

    @rule(
        key=st.sampled_from(KEYS),
        pool=st.sampled_from(POOLS),
        node_id=st.sampled_from(NODES),
        shape=shapes,
        max_concurrency=st.integers(1, 5),
    )
    def add_actor(
        self, key: str, pool: str, node_id: str, shape: ResourceVector, max_concurrency: int
    ) -> None:
        info = ActorInfo(key, pool, node_id, shape, max_concurrency)
        self.ledger.add_actor(info)
        self.scan.add(info)
        # A key added again is a fresh actor: the old one's tasks give nothing back to it.
        self.running = [(k, r) for k, r in self.running if k != key]

    @precondition(lambda self: bool(self.scan.actors))
    @rule(data=st.data())
    def remove_actor(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.scan.actors)))
        self.ledger.remove_actor(key)
        del self.scan.actors[key]

    @rule(pool=st.sampled_from(POOLS), batch=st.lists(requests, min_size=1, max_size=5))
    def place(self, pool: str, batch: list[ResourceVector]) -> None:
        for request in batch:
            placed = self.ledger.place(pool, request)
            expected = self.scan.place(pool, request)
            assert (placed.key if placed else None) == expected, (pool, request)
            if expected is not None:
                self.running.append((expected, request))

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.running) - 1))
        key, request = self.running.pop(index)
        self.ledger.finish(key, request)
        self.scan.finish(key, request)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data(), pool=st.sampled_from(POOLS))
    def finish_then_place_again(self, data: st.DataObject, pool: str) -> None:
        """What a release does: room back, then the waiters tried (the same request again)."""
        request = self.running[data.draw(st.integers(0, len(self.running) - 1))][1]
        self.place(pool, [request, request])  # the second finds no room when the pool is full
        self.finish(data)
        self.place(pool, [request])

    @precondition(lambda self: bool(self.scan.actors))
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.scan.actors)))
        self.ledger.drain(key)
        self.scan.actors[key].draining = True

    @rule(node_id=st.sampled_from(NODES[:3]), alive=st.booleans(), known=st.booleans())
    def node_changes(self, node_id: str, alive: bool, known: bool) -> None:
        if known:
            self.alive[node_id] = alive
        else:
            self.alive.pop(node_id, None)  # gone from Ray's node table altogether
        self._set_nodes()

    @invariant()
    def loads_agree_and_nothing_is_over_committed(self) -> None:
        assert list(self.ledger.actors) == list(self.scan.actors)
        for key, load in self.ledger.actors.items():
            expected = self.scan.actors[key]
            assert (load.running, load.used, load.draining) == (
                expected.running,
                expected.used,
                expected.draining,
            )
            shape = load.info.shape
            assert load.running <= load.info.max_concurrency
            assert load.used.cpus <= shape.cpus + EPSILON
            assert load.used.gpus <= shape.gpus + EPSILON
            assert load.used.memory_mb <= shape.memory_mb

    @invariant()
    def drained_agrees(self) -> None:
        assert self.ledger.drained() == [
            key for key, load in self.scan.actors.items() if load.draining and load.running == 0
        ]


TestIndexAgainstScan = IndexAgainstScan.TestCase
TestIndexAgainstScan.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


# == The index on its own ========================================================================


def index_of(*states: tuple[str, int, ResourceVector]) -> RoomIndex:
    rooms = RoomIndex()
    for arrival, (key, running, used) in enumerate(states):
        rooms.add(key, arrival, running, used, vec(2), 4)
    return rooms


def test_the_least_loaded_actor_with_room_wins_and_ties_go_to_the_first_added() -> None:
    rooms = index_of(("busy", 2, vec(1)), ("late", 1, vec(0.5)), ("early", 1, vec(0.5)))
    # "late" was added before "early": the arrival number decides, not the key.
    assert rooms.best(vec(0.5)) == "late"
    assert rooms.best(vec(1.5)) == "late"  # 0.5 + 1.5 fits in 2
    assert rooms.best(vec(1.6)) is None


def test_a_request_that_found_no_room_finds_it_once_a_task_ends() -> None:
    rooms = index_of(("a", 4, vec(2)))
    assert rooms.best(vec(1)) is None
    assert rooms.best(vec(1)) is None  # answered from the memo of requests with no room
    rooms.move("a", 5, vec(2), fuller=True)  # more load: still no room
    assert rooms.best(vec(1)) is None
    rooms.move("a", 3, vec(1), fuller=False)  # a task ended
    assert rooms.best(vec(1)) == "a"


def test_a_newly_added_actor_is_found_by_a_request_that_found_no_room() -> None:
    rooms = index_of(("a", 4, vec(2)))
    assert rooms.best(vec(1)) is None
    rooms.add("b", 1, 0, ZERO, vec(2), 4)
    assert rooms.best(vec(1)) == "b"


def test_emptied_groups_are_dropped_once_there_are_many() -> None:
    rooms = RoomIndex()
    rooms.add("a", 0, 0, ZERO, vec(1000), 10_000)
    for running in range(1, 600):  # a new state each time: running and use both grow
        rooms.move("a", running, vec(running), fuller=True)
    assert len(rooms._groups) <= 257
    assert rooms.best(vec(1)) == "a"
    rooms.remove("a")
    assert len(rooms) == 0 and rooms.best(ZERO) is None
