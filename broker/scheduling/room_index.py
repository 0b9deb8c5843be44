"""The actors of one pool that can take tasks, grouped by state, so that placing a task costs
the number of distinct states, not the number of actors.

Actors in the same state (tasks running, resources used, shape, concurrency limit) either all
have room for a request or none has, so one check answers for the whole group; a pool of
10,000 actors running one kind of task has a handful of groups. Within a group the actor added
to the ledger first comes first (a heap of arrival numbers), which keeps the ledger's rule:
the least-loaded actor with room, ties to the first added.

Plain Python, driven by the ledger (broker/scheduling/ledger.py), which keeps it in step with
every change of an actor's load and eligibility.
"""

import heapq
from dataclasses import dataclass, field

from workers.resources import EPSILON, ResourceVector

# What decides whether a request fits: running, used, shape, max_concurrency; as plain numbers,
# whose tuple hashes in C (a vector's dataclass hash is Python code, on every placement).
_State = tuple[int, float, float, int, float, float, int, int]
# Groups kept, empty ones included, before the empty ones are dropped.
_MOST_GROUPS = 256


@dataclass(eq=False, slots=True)
class _Group:
    running: int
    used: ResourceVector
    shape: ResourceVector
    max_concurrency: int
    members: dict[str, int] = field(default_factory=dict)  # actor key -> arrival number
    # Arrival numbers of members, smallest first; entries of actors that left stay until they
    # reach the top (or the heap is rebuilt), so leaving costs O(1).
    heap: list[tuple[int, str]] = field(default_factory=list)

    def has_room_for(self, request: ResourceVector) -> bool:
        # ActorLoad.has_room_for without the intermediate vector: the same sums, compared the
        # same way (so a group answers exactly as each of its actors would).
        used, shape = self.used, self.shape
        return (
            self.running < self.max_concurrency
            and used.cpus + request.cpus <= shape.cpus + EPSILON
            and used.gpus + request.gpus <= shape.gpus + EPSILON
            and used.memory_mb + request.memory_mb <= shape.memory_mb
        )

    def first(self) -> tuple[int, str]:
        """The member added to the ledger first: (arrival number, key)."""
        heap, members = self.heap, self.members
        top = heap[0]
        while members.get(top[1]) != top[0]:
            heapq.heappop(heap)  # it left this group
            top = heap[0]
        return top

    def join(self, key: str, arrival: int) -> None:
        self.members[key] = arrival
        if len(self.heap) > 2 * len(self.members) + 16:
            # Mostly stale: start again from the members (a sorted list is a heap).
            self.heap = sorted((a, k) for k, a in self.members.items())
        else:
            heapq.heappush(self.heap, (arrival, key))


class RoomIndex:
    """One pool's eligible actors (alive node, not draining) by state."""

    def __init__(self) -> None:
        self._groups: dict[_State, _Group] = {}
        # Running count -> the groups at it; `_levels` lists the counts present, ascending.
        self._by_level: dict[int, list[_Group]] = {}
        self._levels: list[int] = []
        self._where: dict[str, _Group] = {}
        # Requests (as plain numbers) that found no room since room last grew: under load
        # every arrival tries the head of the queue again, and this answers it at once.
        self._no_room: set[tuple[float, float, int]] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def add(
        self,
        key: str,
        arrival: int,
        running: int,
        used: ResourceVector,
        shape: ResourceVector,
        max_concurrency: int,
        *,
        fuller: bool = False,
    ) -> None:
        """Index actor `key` in this state. `fuller`: it only has less room than before (a
        task was placed on it), so requests that found no room still find none."""
        if not fuller:
            self._no_room.clear()
        state = (
            running,
            used.cpus,
            used.gpus,
            used.memory_mb,
            shape.cpus,
            shape.gpus,
            shape.memory_mb,
            max_concurrency,
        )
        group = self._groups.get(state)
        if group is None:
            group = self._groups[state] = _Group(running, used, shape, max_concurrency)
            level = self._by_level.get(running)
            if level is None:
                self._by_level[running] = [group]
                self._insert_level(running)
            else:
                level.append(group)
        group.join(key, arrival)
        self._where[key] = group

    def move(self, key: str, running: int, used: ResourceVector, *, fuller: bool) -> None:
        """Actor `key`'s load changed (a task started or ended); a no-op when it is not
        indexed (draining, or on a node not alive). `fuller`: as in `add`."""
        group = self._where.get(key)
        if group is None:
            return
        arrival = group.members.pop(key)
        if not group.members and len(self._groups) > _MOST_GROUPS:
            self._drop_empty_groups()
        self.add(key, arrival, running, used, group.shape, group.max_concurrency, fuller=fuller)

    def remove(self, key: str) -> None:
        group = self._where.pop(key, None)
        if group is None:
            return
        del group.members[key]
        # An emptied group stays (an actor moving between two states, as each task starts
        # and ends, would otherwise make and drop one every time), until there are many.
        if not group.members and len(self._groups) > _MOST_GROUPS:
            self._drop_empty_groups()

    def _drop_empty_groups(self) -> None:
        for state, group in list(self._groups.items()):
            if not group.members:
                del self._groups[state]
                level = self._by_level[group.running]
                level.remove(group)
                if not level:
                    del self._by_level[group.running]
                    self._levels.remove(group.running)

    def best(self, request: ResourceVector) -> str | None:
        """The key of the least-loaded actor with room for `request`, ties to the one added
        first; None when no actor has room."""
        asked = (request.cpus, request.gpus, request.memory_mb)
        if asked in self._no_room:
            return None
        for running in self._levels:
            found: tuple[int, str] | None = None
            for group in self._by_level[running]:
                if group.members and group.has_room_for(request):
                    first = group.first()
                    if found is None or first < found:
                        found = first
            if found is not None:
                return found[1]
        self._no_room.add(asked)
        return None

    def _insert_level(self, running: int) -> None:
        levels = self._levels
        index = len(levels)
        while index and levels[index - 1] > running:  # few levels: a short walk from the end
            index -= 1
        levels.insert(index, running)
