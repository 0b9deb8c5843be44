"""The outcome index: retention and its memory cap (pure logic, no RabbitMQ)."""

import pytest
from fakes.sync import FakeClock

import broker.amqp.outcomes
from broker.amqp.outcomes import OutcomeStore
from schemas.codec import encode


def test_outcome_index_stays_under_its_memory_cap() -> None:
    store = OutcomeStore(retention_s=3600, max_bytes=1000)
    for n in range(50):
        store.apply(store.outcome_record(f"t{n}", "ok", b"x" * 100))
    assert store.memory_bytes <= 1000
    assert store.get("t49") is not None  # the newest are kept
    assert store.get("t0") is None  # the oldest went first
    assert store.evicted == 40


def test_duplicates_and_cancels_follow_the_records() -> None:
    store = OutcomeStore(retention_s=3600)
    store.apply(b"\xc1")  # an unreadable record is skipped, never raised
    store.apply(store.outcome_record("a", "ok", b"reply"))
    store.apply(store.outcome_record("a", "error", b"other"))  # the first outcome stays
    stored = store.get("a")
    assert stored is not None and stored.status == "ok" and stored.reply_body == b"reply"
    assert store.get("b") is None
    assert not store.cancel_pending("b")


def test_a_later_outcome_replaces_an_error_the_replay_rule() -> None:
    store = OutcomeStore(retention_s=3600)
    first_error = store.outcome_record("r", "error", b"failed")
    store.apply(first_error)
    store.apply(store.outcome_record("r", "ok", b"fixed"))  # replayed and run again
    stored = store.get("r")
    assert stored is not None and (stored.status, stored.reply_body) == ("ok", b"fixed")
    store.apply(first_error)  # an older record read again (a stream replay) changes nothing
    store.apply(store.outcome_record("r", "error", b"again"))  # an ok is never replaced
    assert store.get("r").reply_body == b"fixed"  # type: ignore[union-attr]
    assert store.memory_bytes == len(b"fixed")


def test_expired_records_are_ignored() -> None:
    store = OutcomeStore(retention_s=0.000001)
    store.apply(store.outcome_record("old", "ok", b"r"))
    assert store.get("old") is None


def test_a_batch_record_folds_every_outcome_in_it() -> None:
    store = OutcomeStore(retention_s=3600)
    records = [store.outcome_record(f"b{n}", "ok", b"r%d" % n) for n in range(3)]
    store.apply(OutcomeStore.batch_record(records))
    assert [store.get(f"b{n}").reply_body for n in range(3)] == [b"r0", b"r1", b"r2"]  # type: ignore[union-attr]


# == Sweeping by age, and what it gives back to the memory cap =================================


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The outcome index's wall clock, moved by hand (records are stamped with it too)."""
    fake = FakeClock()
    monkeypatch.setattr(broker.amqp.outcomes, "time", fake)
    return fake


def remember(store: OutcomeStore, task_id: str, reply: bytes = b"r" * 10) -> None:
    record = store.outcome_record(task_id, "ok", reply)
    assert record is not None
    store.apply(record)


def cancel(store: OutcomeStore, task_id: str, clock: FakeClock) -> None:
    """A cancel record of a task not seen yet, as ControlProcessor.cancel has it written."""
    store.apply(encode({"k": "cancel", "id": task_id, "t": clock.time()}))


def test_sweep_forgets_outcomes_and_cancels_past_the_window_and_counts_them(
    clock: FakeClock,
) -> None:
    store = OutcomeStore(retention_s=100)
    remember(store, "old-1")
    remember(store, "old-2")
    cancel(store, "old-cancel", clock)
    clock.advance(50)
    remember(store, "new", b"n" * 7)
    cancel(store, "new-cancel", clock)
    clock.advance(60)  # the first three are 110 s old, the others 60 s

    assert store.sweep() == 3
    assert store.memory_bytes == 7
    assert store.get("new") is not None and store.cancel_pending("new-cancel")
    assert store.get("old-1") is None and not store.cancel_pending("old-cancel")
    assert store.sweep() == 0


def test_an_outcome_looked_up_past_the_window_is_forgotten_and_its_bytes_freed(
    clock: FakeClock,
) -> None:
    store = OutcomeStore(retention_s=100)
    remember(store, "t", b"x" * 40)
    clock.advance(101)
    assert store.get("t") is None
    assert store.memory_bytes == 0
    assert store.sweep() == 0  # already gone


def test_swept_outcomes_give_their_bytes_back_to_the_memory_cap(clock: FakeClock) -> None:
    store = OutcomeStore(retention_s=100, max_bytes=1000)
    for n in range(10):
        remember(store, f"old-{n}", b"x" * 100)
    assert store.memory_bytes == 1000 and store.evicted == 0
    clock.advance(101)
    assert store.sweep() == 10
    assert store.memory_bytes == 0

    for n in range(10):
        remember(store, f"new-{n}", b"y" * 100)
    assert store.evicted == 0  # the room the sweep freed is really free
    assert all(store.get(f"new-{n}") is not None for n in range(10))


def test_the_memory_cap_forgets_the_oldest_outcomes_until_the_newest_fits(
    clock: FakeClock,
) -> None:
    store = OutcomeStore(retention_s=100, max_bytes=1000)
    remember(store, "a", b"a" * 300)
    remember(store, "b", b"b" * 300)
    remember(store, "c", b"c" * 300)
    remember(store, "big", b"d" * 700)  # a and b must go; c (300) + big (700) fit exactly
    assert [t for t in ("a", "b", "c", "big") if store.get(t) is not None] == ["c", "big"]
    assert store.memory_bytes == 1000
    assert store.evicted == 2


# == Cancels against outcomes ===================================================================


def test_an_outcome_recorded_after_a_cancel_takes_its_place(clock: FakeClock) -> None:
    store = OutcomeStore(retention_s=100)
    cancel(store, "t", clock)
    assert store.cancel_pending("t")
    remember(store, "t")
    assert not store.cancel_pending("t")
    stored = store.get("t")
    assert stored is not None and stored.status == "ok"
    assert store.sweep() == 0  # nothing of the cancel is left to sweep


def test_a_cancel_recorded_after_the_outcome_is_ignored_even_once_the_outcome_expires(
    clock: FakeClock,
) -> None:
    store = OutcomeStore(retention_s=100)
    remember(store, "t")
    clock.advance(10)
    cancel(store, "t", clock)  # too late: it finished
    assert not store.cancel_pending("t")
    clock.advance(95)  # the outcome expires; the cancel it came before was never kept
    assert store.get("t") is None
    assert not store.cancel_pending("t")


def test_a_cancel_is_pending_only_within_the_window(clock: FakeClock) -> None:
    store = OutcomeStore(retention_s=100)
    cancel(store, "t", clock)
    clock.advance(100)
    assert store.cancel_pending("t")  # exactly at the window's edge: still kept
    clock.advance(1)
    assert not store.cancel_pending("t")
    assert store.sweep() == 0  # forgotten when looked up
