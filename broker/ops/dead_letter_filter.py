"""Which dead letters a `swarm dead` command acts on, and how `ls` groups them. Plain Python
over what broker/amqp/dead_letter_box.py read."""

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.amqp.dead_letter_box import DeadLetter


@dataclass(frozen=True)
class LetterFilter:
    """Every given criterion must hold; an empty filter takes every letter. Ages are seconds
    since the letter was dead-lettered; a letter that does not say when (dead-lettered by an
    older daemon) matches no age criterion."""

    codes: tuple[str, ...] = ()
    handlers: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    older_than_s: float | None = None
    newer_than_s: float | None = None

    def __call__(self, letter: "DeadLetter", now: float | None = None) -> bool:
        if self.codes and letter.code not in self.codes:
            return False
        if self.handlers and letter.handler not in self.handlers:
            return False
        if self.queues and letter.queue not in self.queues and letter.task_type not in self.queues:
            return False
        if self.ids and letter.task_id not in self.ids:
            return False
        if self.older_than_s is not None or self.newer_than_s is not None:
            age = letter.age_s(now if now is not None else time.time())
            if age is None:
                return False
            if self.older_than_s is not None and age < self.older_than_s:
                return False
            if self.newer_than_s is not None and age > self.newer_than_s:
                return False
        return True

    @property
    def empty(self) -> bool:
        return self == LetterFilter()


Group = tuple[str, str, str]  # code, handler, queue ("-" where a letter does not say)


def group_of(letter: "DeadLetter") -> Group:
    return (letter.code or "-", letter.handler or "-", letter.queue or "-")


def groups(letters: Iterable["DeadLetter"]) -> list[tuple[Group, int]]:
    """Counts by (code, handler, queue), the largest group first."""
    counted = Counter(group_of(letter) for letter in letters)
    return sorted(counted.items(), key=lambda item: (-item[1], item[0]))
