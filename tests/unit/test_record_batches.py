"""Outcome records batched into stream messages below RabbitMQ's message size limit."""

import asyncio

from broker.amqp.publisher import split_batches


def sizes(batches: list[list[tuple[bytes, "asyncio.Future[None]"]]]) -> list[list[int]]:
    return [[len(record) for record, _ in batch] for batch in batches]


def test_records_are_grouped_in_order_below_the_limit() -> None:
    loop = asyncio.new_event_loop()
    try:
        pending = [(b"x" * n, loop.create_future()) for n in (30, 30, 30, 100, 5, 5)]
        assert sizes(split_batches(pending, 64)) == [[30, 30], [30], [100], [5, 5]]
        # Every record is in exactly one batch, in the order appended.
        flat = [item for batch in split_batches(pending, 64) for item in batch]
        assert flat == pending
        assert split_batches([], 64) == []
    finally:
        loop.close()
