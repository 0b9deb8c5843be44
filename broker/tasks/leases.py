"""Lease headers that only Swarm can write.

A renewal copy of a long task (see `TaskProcessor._keep_lease`) carries `x-swarm-lease`, and
that header changes what the daemon does with the message: a copy of a task that is running
here is held and settled silently, a copy of a finished task is acknowledged without a reply.
Were the header taken at its word, a producer could set it on a republished duplicate and
never get its reply. So the value is sealed: `<n>.<hmac>` where the HMAC (SHA-256) covers the
lease number, the queue and a digest of the body, under a key the producer does not have. A
copy carries how often its task was delivered before it, under the same seal, so the
redelivery limit (SWARM_MAX_DELIVERIES) counts across renewal copies, each of which is a new
message to RabbitMQ: `<n>.<hmac>` for a copy of a task delivered once (the common case, and
what copies made before the count was carried mean), `<n>:<deliveries>.<hmac>` otherwise. A
header whose seal does not verify is ignored: the message is an ordinary task (it is still
copied unchanged into a dead letter).

The key is `SWARM_LEASE_SECRET` when set (give every daemon of a deployment the same one, so
a standby recognises the active daemon's copies), else random per daemon: then a standby
treats a dead daemon's copies as ordinary duplicates, which are run once and answered from the
outcome store, at worst one extra reply, as for any daemon death.
"""

import hashlib
import hmac
import secrets

from broker.tasks.delivery import LEASE_HEADER, Delivery


class LeaseSeal:
    __slots__ = ("_key",)

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = secret or secrets.token_bytes(32)

    def header_value(self, delivery: Delivery, lease: int, deliveries: int = 1) -> str:
        """The `x-swarm-lease` value for the `lease`-th renewal copy of `delivery`, carrying
        `deliveries`: how often the task was delivered before the copy's own deliveries
        (RabbitMQ's count starts again on the copy, a new message)."""
        number = str(lease) if deliveries == 1 else f"{lease}:{deliveries}"
        return f"{number}.{self._mac(delivery, lease, deliveries)}"

    def verified_lease(self, delivery: Delivery) -> int:
        """n when `delivery` is the n-th renewal copy Swarm made; 0 for anything else,
        including a header a producer wrote."""
        return self.verified(delivery)[0]

    def verified(self, delivery: Delivery) -> tuple[int, int]:
        """(lease, deliveries carried) of a renewal copy Swarm made; (0, 0) for anything
        else, including a header a producer wrote. A copy without a count carries 1."""
        headers = delivery.properties.get("headers")
        if not headers:
            return 0, 0
        value = headers.get(LEASE_HEADER)
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        if not isinstance(value, str):
            return 0, 0
        number, _, mac = value.partition(".")
        lease_text, _, deliveries_text = number.partition(":")
        # ASCII only: str.isdigit() accepts "²", which int() refuses, and compare_digest
        # refuses non-ASCII text. A header a producer wrote must never raise here.
        if not (_small_number(lease_text) and mac.isascii()):
            return 0, 0
        if deliveries_text and not _small_number(deliveries_text):
            return 0, 0
        lease, deliveries = int(lease_text), int(deliveries_text or 1)
        if lease < 1 or not hmac.compare_digest(mac, self._mac(delivery, lease, deliveries)):
            return 0, 0
        return lease, deliveries

    def _mac(self, delivery: Delivery, lease: int, deliveries: int) -> str:
        # Not the message_id: aiormq gives a copy published without one a random one.
        digest = hashlib.sha256(delivery.body).hexdigest()
        signed = f"{lease}\0{delivery.queue}\0{digest}"
        if deliveries != 1:
            signed += f"\0{deliveries}"
        return hmac.new(self._key, signed.encode(), hashlib.sha256).hexdigest()


def _small_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9
