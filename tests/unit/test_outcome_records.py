"""Outcome records and their sizes: what the store writes, and what it reads back (no RabbitMQ)."""

from broker.amqp.outcomes import MIB, OutcomeStore


def test_a_record_larger_than_the_task_body_limit_is_read_back() -> None:
    store = OutcomeStore(retention_s=3600)
    reply = b"r" * (9 * MIB)  # over the 8 MiB task-body limit that used to refuse it
    record = store.outcome_record("big", "ok", reply)
    assert record is not None
    store.apply(record)
    stored = store.get("big")
    assert stored is not None and stored.reply_body == reply


def test_a_batch_of_large_records_is_read_back() -> None:
    store = OutcomeStore(retention_s=3600)
    records = [store.outcome_record(f"b{n}", "ok", bytes([n]) * (5 * MIB)) for n in range(3)]
    assert all(record is not None for record in records)
    store.apply(OutcomeStore.batch_record([r for r in records if r is not None]))
    for n in range(3):
        stored = store.get(f"b{n}")
        assert stored is not None and stored.reply_body == bytes([n]) * (5 * MIB)


def test_a_reply_over_the_limit_is_not_recorded() -> None:
    store = OutcomeStore(retention_s=3600, max_reply_bytes=1024)
    assert store.outcome_record("small", "ok", b"x" * 1024) is not None
    assert store.outcome_record("large", "ok", b"x" * 1025) is None
    assert store.unrecorded == 1
    assert store.get("large") is None


def test_the_reply_limit_never_exceeds_what_the_index_holds() -> None:
    store = OutcomeStore(retention_s=3600, max_bytes=1000, max_reply_bytes=10 * MIB)
    assert store.max_reply_bytes == 1000
    assert store.outcome_record("too-large", "ok", b"x" * 1001) is None


def test_a_record_larger_than_the_index_does_not_push_the_others_out() -> None:
    # Written by a daemon with a larger memory cap: this one skips it rather than evict all.
    writer = OutcomeStore(retention_s=3600)
    reader = OutcomeStore(retention_s=3600, max_bytes=1000)
    for n in range(5):
        record = writer.outcome_record(f"t{n}", "ok", b"x" * 100)
        assert record is not None
        reader.apply(record)
    huge = writer.outcome_record("huge", "ok", b"x" * 5000)
    assert huge is not None
    reader.apply(huge)
    assert reader.get("huge") is None
    assert all(reader.get(f"t{n}") is not None for n in range(5))
    assert reader.evicted == 0


def test_a_record_that_is_not_one_is_skipped() -> None:
    store = OutcomeStore(retention_s=3600)
    store.apply(b"\xc1")  # not msgpack
    store.apply(b"\x91\x91\x91\x91\x91\x91\x91\x90")  # nested arrays, not a record
    store.apply(b"\x80")  # an empty map: no kind
    assert store.memory_bytes == 0


def test_records_of_the_wrong_shape_are_skipped_not_raised() -> None:
    """Anyone allowed to publish to the stream can write a record: a malformed one must not
    raise out of the stream consumer, nor be stored to fail later."""
    import math
    import time

    from schemas.codec import encode

    store = OutcomeStore(retention_s=3600)
    now = time.time()
    bad = [
        {"k": "outcome", "id": "no-body", "t": now},
        {"k": "outcome", "id": "str-body", "s": "ok", "r": "text", "t": now},
        {"k": "outcome", "id": "nan-time", "s": "ok", "r": b"x", "t": math.nan},
        {"k": "outcome", "id": 7, "s": "ok", "r": b"x", "t": now},
        {"k": "cancel", "id": "inf-time", "t": math.inf},
        {"k": "batch", "items": [b"\xc1", "not bytes", encode({"k": "cancel"})]},
    ]
    for entry in bad:
        store.apply(encode(entry))
    for task_id in ("no-body", "str-body", "nan-time", "7"):
        assert store.get(task_id) is None
    assert not store.cancel_pending("inf-time")
    store.apply(encode({"k": "outcome", "id": "fine", "s": "ok", "r": b"x", "t": now}))
    fine = store.get("fine")
    assert fine is not None and fine.reply_body == b"x"
