"""Lease headers that only Swarm can write.

A renewal copy of a long task (see `TaskProcessor._keep_lease`) carries `x-swarm-lease`, and
that header changes what the daemon does with the message: a copy of a task that is running
here is held and settled silently, a copy of a finished task is acknowledged without a reply.
Were the header taken at its word, a producer could set it on a republished duplicate and
never get its reply. So the value is sealed: `<n>.<hmac>` where the HMAC (SHA-256) covers the
lease number, the queue and a digest of the body, under a key the producer
does not have. A header whose seal does not verify is ignored: the message is an ordinary
task (it is still copied unchanged into a dead letter).

The key is `SWARM_LEASE_SECRET` when set (give every daemon of a deployment the same one, so
a standby recognises the active daemon's copies), else random per daemon: then a standby
treats a dead daemon's copies as ordinary duplicates, which are run once and answered from the
outcome store, at worst one extra reply, as for any daemon death.
"""

import hashlib
import hmac
import secrets

from broker.delivery import LEASE_HEADER, Delivery


class LeaseSeal:
    __slots__ = ("_key",)

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = secret or secrets.token_bytes(32)

    def header_value(self, delivery: Delivery, lease: int) -> str:
        """The `x-swarm-lease` value for the `lease`-th renewal copy of `delivery`."""
        return f"{lease}.{self._mac(delivery, lease)}"

    def verified_lease(self, delivery: Delivery) -> int:
        """n when `delivery` is the n-th renewal copy Swarm made; 0 for anything else,
        including a header a producer wrote."""
        headers = delivery.properties.get("headers")
        if not headers:
            return 0
        value = headers.get(LEASE_HEADER)
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        if not isinstance(value, str):
            return 0
        number, _, mac = value.partition(".")
        # ASCII only: str.isdigit() accepts "²", which int() refuses, and compare_digest
        # refuses non-ASCII text. A header a producer wrote must never raise here.
        if not (number.isascii() and number.isdigit() and len(number) <= 9 and mac.isascii()):
            return 0
        lease = int(number)
        if lease < 1 or not hmac.compare_digest(mac, self._mac(delivery, lease)):
            return 0
        return lease

    def _mac(self, delivery: Delivery, lease: int) -> str:
        # Not the message_id: aiormq gives a copy published without one a random one.
        digest = hashlib.sha256(delivery.body).hexdigest()
        signed = f"{lease}\0{delivery.queue}\0{digest}".encode()
        return hmac.new(self._key, signed, hashlib.sha256).hexdigest()
