"""An asyncio TCP proxy for fault injection between a client and RabbitMQ.

    async with TcpProxy("127.0.0.1", 5672) as proxy:
        url = proxy.url_for(amqp_url)   # same URL, host and port of the proxy
        ...
        await proxy.cut()               # close every live connection, both ways
        proxy.stall(); proxy.resume()   # hold bytes without closing, then let them flow
        await proxy.wait_held(1)        # until a stall has held bytes in at least one pump
        proxy.block(); proxy.unblock()  # refuse new connections (reset at once)

It listens on 127.0.0.1 (an ephemeral port) and forwards only to a 127.0.0.1 target. Each
direction moves at most one chunk at a time, so a stalled link holds at most a chunk per
direction in the proxy and the rest in the kernel's socket buffers (TCP backpressure).
Everything waits on events: nothing polls.
"""

import asyncio
import contextlib
import socket
import ssl
import struct
import urllib.parse
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

LOCALHOST = "127.0.0.1"
LOCAL_NAMES = (LOCALHOST, "localhost")
CHUNK_BYTES = 64 * 1024
_Proxy = TypeVar("_Proxy", bound="TcpProxy")


def local_target(url: str) -> tuple[str, int] | None:
    """The (host, port) of an amqp:// URL when the proxy may forward there (127.0.0.1 only);
    None for a remote broker."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in LOCAL_NAMES:
        return None
    return LOCALHOST, parts.port or 5672


class _Link:
    """One proxied connection: the client's side, RabbitMQ's side, and the two pumps."""

    def __init__(
        self,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.pumps: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class TcpProxy:
    def __init__(
        self,
        target_host: str = LOCALHOST,
        target_port: int = 5672,
        *,
        server_ssl: ssl.SSLContext | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if target_host not in LOCAL_NAMES:
            raise ValueError("the test proxy forwards to 127.0.0.1 only")
        self.target_host = LOCALHOST
        self.target_port = target_port
        self._server_ssl = server_ssl
        self._chunk_bytes = chunk_bytes
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._blocked = False
        self._changed = asyncio.Condition()
        self.port = 0
        self.accepted = 0  # connections accepted and forwarded
        self.refused = 0  # connections turned away while blocked (or the target refused)
        self.cuts = 0  # connections closed by cut()
        # Chunks a stall held back: each direction of a link holds at most one at a time.
        self.held = 0

    # -- life cycle -----------------------------------------------------------------------

    async def start(self: _Proxy) -> _Proxy:
        self._server = await asyncio.start_server(
            self._on_client, LOCALHOST, 0, ssl=self._server_ssl, limit=self._chunk_bytes
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.cut()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self: _Proxy) -> _Proxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- addressing -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOCALHOST

    def url_for(self, url: str, *, host: str | None = None, scheme: str | None = None) -> str:
        """`url` with its host and port replaced by the proxy's (credentials, vhost and query
        kept); `host` overrides the host name written (e.g. `localhost` for TLS)."""
        parts = urllib.parse.urlsplit(url)
        credentials = ""
        if parts.username is not None:
            credentials = urllib.parse.quote(urllib.parse.unquote(parts.username), "")
            if parts.password is not None:
                credentials += ":" + urllib.parse.quote(urllib.parse.unquote(parts.password), "")
            credentials += "@"
        netloc = f"{credentials}{host or self.host}:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(scheme=scheme or parts.scheme, netloc=netloc))

    # -- faults ---------------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    async def cut(self) -> int:
        """Close every live connection, both ways (an abortive close: the peers see a reset).
        The proxy keeps listening, so clients can reconnect. Returns how many were cut."""
        links = list(self._links)
        for link in links:
            link.abort()
        pumps = [pump for link in links for pump in link.pumps]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        self.cuts += len(links)
        return len(links)

    def stall(self) -> None:
        """Stop forwarding bytes in both directions; connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again what was held during a stall, and everything after it."""
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def block(self) -> None:
        """Turn away new connections (reset at once); live ones are not touched."""
        self._blocked = True

    def unblock(self) -> None:
        self._blocked = False

    async def wait_accepted(self, count: int, timeout_s: float = 60.0) -> None:
        """Until at least `count` connections were accepted in all (e.g. a reconnect)."""
        await self._wait(lambda: self.accepted >= count, timeout_s)

    async def wait_live(self, count: int, timeout_s: float = 60.0) -> None:
        """Until at least `count` connections are open through the proxy."""
        await self._wait(lambda: self.live >= count, timeout_s)

    async def wait_refused(self, count: int, timeout_s: float = 60.0) -> None:
        """Until at least `count` connections were turned away in all (e.g. while blocked)."""
        await self._wait(lambda: self.refused >= count, timeout_s)

    async def wait_held(self, count: int, timeout_s: float = 60.0) -> None:
        """Until stalls have held back at least `count` chunks in all (a stall that bites)."""
        await self._wait(lambda: self.held >= count, timeout_s)

    # -- internals ------------------------------------------------------------------------

    async def _wait(self, done: Callable[[], bool], timeout_s: float) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(done)

        await asyncio.wait_for(until(), timeout_s)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._serve(client_reader, client_writer)
        finally:
            self._handlers.discard(handler)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if self._blocked:
            self.refused += 1
            _reset(client_writer)
            await self._notify()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port, limit=self._chunk_bytes
            )
        except OSError:
            self.refused += 1
            _reset(client_writer)
            await self._notify()
            return
        link = _Link(client_writer, upstream_writer)
        link.pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, client_writer)),
        ]
        self._links.add(link)
        self.accepted += 1
        await self._notify()
        try:
            # When one direction ends (EOF, error, cut), the whole connection ends.
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            for writer in (client_writer, upstream_writer):
                writer.close()
            for writer in (client_writer, upstream_writer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5.0)
            await self._notify()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(self._chunk_bytes):
                if not self._flowing.is_set():
                    self.held += 1
                    await self._notify()
                    await self._flowing.wait()
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a refused connection looks to the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
