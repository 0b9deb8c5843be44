"""The Celery side of the bench: one no-op task that returns its argument, on the vhost in
BENCH_AMQP_URL. Replies go through the `rpc://` result backend, which publishes each result
to the task message's `reply_to` with its `correlation_id`: the bench's client reads them as
it reads Swarm's. Settings match the other systems: late acks (after the result is
published), publisher confirms, persistent results, a prefetch of 256, a quorum queue.

    celery -A celery_app worker   # run from bench/ (bench/extras.py does it)
"""

import os

from celery import Celery

PREFETCH = 256
CONCURRENCY = int(os.environ.get("BENCH_CELERY_CONCURRENCY", "2"))

app = Celery("bench", broker=os.environ["BENCH_AMQP_URL"], backend="rpc://")
app.conf.update(
    task_acks_late=True,
    task_default_queue="bench.celery",
    task_default_queue_type="quorum",
    worker_detect_quorum_queues=True,
    worker_prefetch_multiplier=max(1, PREFETCH // CONCURRENCY),
    worker_concurrency=CONCURRENCY,
    result_persistent=True,
    broker_transport_options={"confirm_publish": True},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(payload: str) -> str:
    return payload
