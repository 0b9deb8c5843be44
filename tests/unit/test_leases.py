"""The lease seal: only a renewal copy Swarm made counts as one."""

import time

import pytest

from broker.tasks.delivery import LEASE_HEADER, Delivery
from broker.tasks.leases import LeaseSeal


def delivery(
    headers: dict[str, object] | None, body: bytes = b"task", queue: str = "q"
) -> Delivery:
    return Delivery(
        body=body,
        queue=queue,
        task_type="inference",
        properties={"headers": headers},
        redelivered=False,
        received_at_s=time.monotonic(),
    )


def test_a_copy_sealed_by_the_daemon_verifies() -> None:
    seal = LeaseSeal(b"k")
    original = delivery(None)
    for lease in (1, 2, 40):
        copy = delivery({LEASE_HEADER: seal.header_value(original, lease)})
        assert seal.verified_lease(copy) == lease


def test_a_seal_of_another_daemon_verifies_only_with_the_same_secret() -> None:
    value = LeaseSeal(b"shared").header_value(delivery(None), 3)
    copy = delivery({LEASE_HEADER: value})
    assert LeaseSeal(b"shared").verified_lease(copy) == 3
    assert LeaseSeal(b"other").verified_lease(copy) == 0
    assert LeaseSeal().verified_lease(copy) == 0  # random key per daemon


@pytest.mark.parametrize(
    "forged",
    [
        *(1, "1", b"1", "1.", "1.deadbeef", "0.x", "-1.x", "x.y", True, 1.0, None),
        *("9" * 40 + ".ab", "\u00b2.x", "1.\u00e9", b"1.\xff", "\uff11.ab", ""),
    ],
)
def test_a_header_a_producer_wrote_is_not_a_lease(forged: object) -> None:
    assert LeaseSeal(b"k").verified_lease(delivery({LEASE_HEADER: forged})) == 0


def test_a_seal_does_not_carry_over_to_another_body_queue_or_number() -> None:
    seal = LeaseSeal(b"k")
    value = seal.header_value(delivery(None, body=b"a", queue="q"), 1)
    assert seal.verified_lease(delivery({LEASE_HEADER: value}, body=b"b", queue="q")) == 0
    assert seal.verified_lease(delivery({LEASE_HEADER: value}, body=b"a", queue="r")) == 0
    _, mac = value.split(".")
    assert seal.verified_lease(delivery({LEASE_HEADER: f"2.{mac}"}, body=b"a")) == 0
    assert seal.verified_lease(delivery({LEASE_HEADER: value.encode()}, body=b"a")) == 1
