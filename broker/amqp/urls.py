"""RabbitMQ URLs as settings give them: one URL, or several (the nodes of a cluster) as a
comma-separated string or a list; and URLs with their password masked for logs and errors."""

import re
from collections.abc import Iterable

# A comma ends a URL only where the next one begins (`scheme://`) or nothing follows: a comma
# inside a URL (in a query argument, a password) stays part of it.
_NEXT_URL = re.compile(r",(?=\s*(?:[A-Za-z][A-Za-z0-9+.-]*://|,|$))")


def split_urls(value: str | Iterable[str]) -> tuple[str, ...]:
    """The URLs of `value`, in order, blanks dropped: `"amqp://a/,amqp://b/"` or a list."""
    parts = _NEXT_URL.split(value) if isinstance(value, str) else list(value)
    return tuple(part.strip() for part in parts if part.strip())


def redact(url: str) -> str:
    """The URL (or comma-separated URLs) with each password replaced, for logs and errors."""
    urls = split_urls(url)
    if len(urls) > 1:
        return ",".join(_redact_one(one) for one in urls)
    return _redact_one(url)


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
