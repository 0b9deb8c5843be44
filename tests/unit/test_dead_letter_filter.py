"""Which dead letters `swarm dead` acts on, and how `ls` groups them (plain logic)."""

from typing import Any

from broker.amqp.dead_letter_box import DeadLetter
from broker.ops.dead_letter_filter import LetterFilter, groups

NOW = 1_000_000.0


def letter(**fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "message": None,
        "task_id": "t",
        "code": "handler_error",
        "error": "boom",
        "handler": "fail",
        "task_type": "inference",
        "queue": "swarm.tasks.inference",
        "attempts": 1,
        "traceback": None,
        "dead_lettered_at": NOW - 60,
    }
    values.update(fields)
    return DeadLetter(**values)


def test_an_empty_filter_takes_every_letter() -> None:
    assert LetterFilter().empty
    assert LetterFilter()(letter(dead_lettered_at=None), NOW)


def test_every_criterion_must_hold() -> None:
    chosen = LetterFilter(codes=("handler_error",), handlers=("fail",), queues=("inference",))
    assert chosen(letter(), NOW)  # the queue given as a task type
    assert not chosen(letter(code="unknown_handler"), NOW)
    assert not chosen(letter(handler="other"), NOW)
    assert LetterFilter(queues=("swarm.tasks.inference",))(letter(), NOW)
    assert not LetterFilter(ids=("x",))(letter(), NOW)


def test_ages_count_from_the_dead_lettering_and_a_letter_without_one_matches_none() -> None:
    assert LetterFilter(older_than_s=30)(letter(), NOW)
    assert not LetterFilter(older_than_s=120)(letter(), NOW)
    assert LetterFilter(newer_than_s=120)(letter(), NOW)
    assert not LetterFilter(newer_than_s=30)(letter(), NOW)
    assert not LetterFilter(older_than_s=0)(letter(dead_lettered_at=None), NOW)


def test_groups_count_by_code_handler_and_queue_largest_first() -> None:
    letters = [letter(), letter(code="unknown_handler", handler=None), letter()]
    assert groups(letters) == [
        (("handler_error", "fail", "swarm.tasks.inference"), 2),
        (("unknown_handler", "-", "swarm.tasks.inference"), 1),
    ]
