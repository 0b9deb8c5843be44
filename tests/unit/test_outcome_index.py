"""The outcome index: retention and its memory cap (pure logic, no RabbitMQ)."""

from broker.outcomes import OutcomeStore


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


def test_expired_records_are_ignored() -> None:
    store = OutcomeStore(retention_s=0.000001)
    store.apply(store.outcome_record("old", "ok", b"r"))
    assert store.get("old") is None


def test_a_batch_record_folds_every_outcome_in_it() -> None:
    store = OutcomeStore(retention_s=3600)
    records = [store.outcome_record(f"b{n}", "ok", b"r%d" % n) for n in range(3)]
    store.apply(OutcomeStore.batch_record(records))
    assert [store.get(f"b{n}").reply_body for n in range(3)] == [b"r0", b"r1", b"r2"]  # type: ignore[union-attr]
