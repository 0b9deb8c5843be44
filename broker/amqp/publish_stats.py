"""Counts of publishes RabbitMQ refused or that had to be cut down, and their metrics.

Kept by the ingress across sessions; read by Prometheus through `PublishCollector` on the
daemon's registry (scraped from the metrics thread: plain int reads, nothing to lock).
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.reply import ErrorCode
from schemas.topology import REPLY_UNDELIVERABLE

# Every code a dead letter can carry: each is exported from the start, at 0, so that a rate
# over the counter sees its first dead letter.
DEAD_LETTER_CODES = (*get_args(ErrorCode), REPLY_UNDELIVERABLE)


@dataclass
class PublishStats:
    # Dead letters swarm.dead confirmed, by error code.
    dead_letters: dict[str, int] = field(default_factory=dict)
    # swarm.dead nacked a dead letter (each refusal counts; the letter is retried).
    dead_letters_refused: int = 0
    # Tasks held, unacknowledged, while their dead letter waits for room on swarm.dead.
    dead_letters_waiting: int = 0
    # Replies a reply_to queue nacked (full, reject-publish) through every re-send:
    # dead-lettered instead.
    replies_refused: int = 0
    # Replies sent again after a nack (a quorum queue electing a leader nacks for a while).
    replies_resent: int = 0
    # Reply copies a queue bound to swarm.results refused: counted, not sent again.
    results_copies_refused: int = 0
    # Replies and dead letters whose headers were cut to fit the frame size.
    headers_truncated: int = 0
    # Outcomes published in stripped form after costing too many connections.
    stripped: int = 0
    # Outcomes given up on (their task requeued) after the stripped form failed too.
    abandoned: int = 0


class PublishCollector(Collector):
    def __init__(self, stats: PublishStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        counters = (
            (
                "swarm_dead_letters_refused",
                "Dead letters swarm.dead refused",
                s.dead_letters_refused,
            ),
            ("swarm_replies_refused", "Replies their reply_to queue refused", s.replies_refused),
            ("swarm_replies_resent", "Replies sent again after a refusal", s.replies_resent),
            (
                "swarm_results_copies_refused",
                "Reply copies a queue bound to swarm.results refused",
                s.results_copies_refused,
            ),
            ("swarm_headers_truncated", "Replies and dead letters cut to fit", s.headers_truncated),
            ("swarm_outcomes_stripped", "Outcomes published stripped", s.stripped),
            ("swarm_outcomes_abandoned", "Outcomes given up on, task requeued", s.abandoned),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        by_code = dict.fromkeys(DEAD_LETTER_CODES, 0)
        by_code.update(s.dead_letters)  # one C-level copy: safe against the loop's writes
        family = CounterMetricFamily(
            "swarm_dead_letters", "Dead letters confirmed by swarm.dead, by code", labels=["code"]
        )
        for code, count in sorted(by_code.items()):
            family.add_metric([code], count)
        yield family
        yield GaugeMetricFamily(
            "swarm_dead_letters_waiting",
            "Tasks held while swarm.dead refuses their dead letter",
            value=s.dead_letters_waiting,
        )
