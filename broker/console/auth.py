"""Who may use the console, and how an action proves it came from the console's own page.

With a token (SWARM_CONSOLE_TOKEN), every request must carry it: `Authorization: Bearer
<token>`, or the cookie the login form sets (HttpOnly, SameSite=Strict; its value is derived
from the token, never the token itself). A request without it is answered 401: the login form
for a page, plain text otherwise. Without a token the console must be bound to loopback
(cli.py refuses to start otherwise).

Actions are POSTs, and each must pass two checks: the request's Origin (or, lacking one, its
Referer) is the console's own, and the form carries the form token the page was rendered with
(derived from a secret drawn at start, so a page from another process's console is refused).
"""

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "swarm_console"
LOGIN_PATH = "/login"
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def session_value(token: str) -> str:
    """The login cookie's value: proves the token was given, and is useless elsewhere."""
    return hmac.new(token.encode(), b"swarm-console-session", hashlib.sha256).hexdigest()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class TokenGuard:
    """ASGI middleware: with a token, a request without it is refused (401)."""

    def __init__(self, app: ASGIApp, token: str | None, login_page: Callable[[], bytes]) -> None:
        self.app = app
        self._token = token
        self._session = session_value(token) if token is not None else None
        self._login_page = login_page

    def allowed(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        authorization = _header(scope, b"authorization") or ""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token.encode()
        ):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(_header(scope, b"cookie") or "")
        except Exception:  # a malformed Cookie header is no credential
            return False
        morsel = cookie.get(COOKIE)
        assert self._session is not None
        return morsel is not None and hmac.compare_digest(
            morsel.value.encode(), self._session.encode()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(scope) or scope["path"] == LOGIN_PATH:
            await self.app(scope, receive, send)
            return
        wants_page = scope["method"] == "GET" and "text/html" in (_header(scope, b"accept") or "")
        if wants_page:
            body, kind = self._login_page(), b"text/html; charset=utf-8"
        else:
            body, kind = b"401: this console needs its token\n", b"text/plain; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", kind),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="swarm console"'),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class FormGuard:
    """The form token every action form carries, and the same-origin check."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.form_token = hmac.new(self._secret, b"swarm-console-form", hashlib.sha256).hexdigest()

    def check(self, headers: dict[str, str], host: str, form_token: str | None) -> str | None:
        """Why a POST is refused, or None when it may go on. `headers` lower-cased names."""
        origin = headers.get("origin") or headers.get("referer")
        if not origin:
            return "no Origin or Referer: actions are taken from the console's own pages"
        if urlsplit(origin).netloc != host:
            return f"Origin {origin!r} is not this console's"
        if form_token is None or not hmac.compare_digest(
            form_token.encode(), self.form_token.encode()
        ):
            return "the form token is missing or stale: reload the page"
        return None
