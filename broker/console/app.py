"""The console's Starlette application: its pages, its actions (absent when read-only), the
live feed, and the static assets it serves itself."""

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from broker.console.auth import COOKIE, LOGIN_PATH, FormGuard, TokenGuard, session_value
from broker.console.feed import Feed
from broker.console.sources import Daemon, DeadLetters, Selection, by_label, scrape
from broker.errors import BrokerError
from broker.ops.dead_letter_filter import LetterFilter

HERE = Path(__file__).parent
MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class ConsoleConfig:
    amqp_url: str
    metrics_url: str
    token: str | None = None
    read_only: bool = False
    interval_s: float = 2.0
    amqp_shuffle: bool = False


def _json(value: Any) -> str:
    def printable(item: Any) -> Any:
        if isinstance(item, bytes):
            return item.decode(errors="replace")
        return str(item)

    return json.dumps(value, indent=2, sort_keys=True, default=printable)


class Console:
    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.daemon = Daemon(config.amqp_url, shuffle=config.amqp_shuffle)
        self.dead = DeadLetters(config.amqp_url)
        self.feed = Feed(lambda: scrape(config.metrics_url), config.interval_s)
        self.forms = FormGuard()
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
        )
        self.templates.filters["json"] = _json

    # -- rendering -------------------------------------------------------------------------------
    def page(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(
            read_only=self.config.read_only,
            form_token=self.forms.form_token,
            with_token=self.config.token is not None,
            **context,
        )
        return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})

    def login_page(self) -> bytes:
        return self.templates.get_template("login.html").render(error=None).encode()

    async def _daemon(self, read: Any) -> tuple[Any, str | None]:
        """A control answer, or the reason there is none (said on the page)."""
        try:
            return await read, None
        except (BrokerError, OSError, asyncio.TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The POSTed form, once the same-origin and form-token checks pass."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return Response("form too large\n", status_code=413)
        form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        refused = self.forms.check(
            {k.lower(): v for k, v in request.headers.items()},
            request.headers.get("host", ""),
            form.get("form_token"),
        )
        if refused is not None:
            return Response(f"403: {refused}\n", status_code=403, media_type="text/plain")
        return form

    # -- pages -----------------------------------------------------------------------------------
    async def overview(self, request: Request) -> Response:
        return self.page(
            "overview.html", active="overview", latest=self.feed.latest, error=self.feed.error
        )

    async def events(self, request: Request) -> Response:
        return StreamingResponse(
            self.feed.events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def cluster(self, request: Request) -> Response:
        status, error = await self._daemon(self.daemon.status())
        return self.page("cluster.html", active="cluster", status=status, error=error)

    async def queues(self, request: Request) -> Response:
        status, error = await self._daemon(self.daemon.status())
        rows = []
        metrics_error = None
        try:
            scraped = await scrape(self.config.metrics_url)
        except OSError as exc:
            scraped, metrics_error = {}, f"metrics not read: {exc}"
        consumers = by_label(scraped, "swarm_queue_consumers", "queue")
        oldest = by_label(scraped, "swarm_queue_oldest_waiting_seconds", "queue")
        for name, depth in (status or {}).get("queues", {}).items():
            count = consumers.get(name)
            rows.append(
                {
                    "name": name,
                    "depth": depth,
                    "oldest_s": oldest.get(name),
                    "consumers": None if count is None else int(count),
                    # A daemon pauses a queue by cancelling its consumer (backpressure).
                    "consumed": None if count is None else count > 0,
                }
            )
        return self.page(
            "queues.html", active="queues", rows=rows, error=error, metrics_error=metrics_error
        )

    async def tasks(self, request: Request) -> Response:
        task_id = request.query_params.get("id", "").strip()
        answer, error = (None, None)
        if task_id:
            answer, error = await self._daemon(self.daemon.task(task_id))
        return self.page("tasks.html", active="tasks", task_id=task_id, answer=answer, error=error)

    async def cancel(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        task_id = form.get("id", "").strip()
        if form.get("confirm") != "yes":
            # As replay and purge: first a page naming the task and its state, then the cancel.
            looked, error = await self._daemon(self.daemon.task(task_id))
            return self.page(
                "cancel_confirm.html", active="tasks", task_id=task_id, answer=looked, error=error
            )
        answer, error = await self._daemon(self.daemon.cancel(task_id))
        looked, _ = await self._daemon(self.daemon.task(task_id))
        return self.page(
            "tasks.html",
            active="tasks",
            task_id=task_id,
            answer=looked,
            cancelled=answer,
            error=error,
        )

    async def dead_letters(self, request: Request) -> Response:
        try:
            grouped, total = await self.dead.grouped()
            error = None
        except (BrokerError, OSError) as exc:
            grouped, total, error = [], 0, f"{type(exc).__name__}: {exc}"
        return self.page(
            "dead.html", active="dead", groups=grouped, total=total, error=error, letters=None
        )

    async def dead_list(self, request: Request) -> Response:
        selection = _selection(dict(request.query_params))
        letters = await self.dead.read(selection)
        return self.page(
            "dead_list.html",
            active="dead",
            letters=letters,
            fields=_fields(dict(request.query_params)),
        )

    async def dead_letter(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        letter = await self.dead.show(task_id)
        if letter is None:
            return self.page("missing.html", 404, active="dead", what=f"dead letter {task_id}")
        return self.page("dead_letter.html", active="dead", letter=letter)

    async def dead_action(self, request: Request) -> Response:
        """Replay or purge: first a confirmation page naming the letters, then the action."""
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        action = request.path_params["action"]
        if action not in ("replay", "purge"):
            return Response("404: no such action\n", status_code=404)
        selection = _selection(form)
        fields = _fields(form)
        if form.get("confirm") != "yes":
            letters = await self.dead.read(selection)
            return self.page(
                "confirm.html",
                active="dead",
                action=action,
                letters=letters,
                fields=fields,
                everything=selection.everything,
            )
        done = await (self.dead.replay if action == "replay" else self.dead.purge)(selection)
        return self.page("done.html", active="dead", action=action, done=done)

    # -- login -----------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        if request.method == "GET" or self.config.token is None:
            return self.page("login.html", error=None)
        body = await request.body()
        given = parse_qs(body[:MAX_FORM_BYTES].decode(errors="replace")).get("token", [""])[-1]
        if not hmac.compare_digest(given.encode(), self.config.token.encode()):
            return self.page("login.html", 401, error="not the console's token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            session_value(self.config.token),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    # -- the application ---------------------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [
            Route("/", self.overview),
            Route("/events", self.events),
            Route("/cluster", self.cluster),
            Route("/queues", self.queues),
            Route("/tasks", self.tasks),
            Route("/dead", self.dead_letters),
            Route("/dead/letters", self.dead_list),
            Route("/dead/letter/{task_id:path}", self.dead_letter),
            Route(LOGIN_PATH, self.login, methods=["GET", "POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        if not self.config.read_only:
            routes += [
                Route("/tasks/cancel", self.cancel, methods=["POST"]),
                Route("/dead/{action:str}", self.dead_action, methods=["POST"]),
            ]
        return Starlette(
            routes=routes,
            middleware=[
                Middleware(TokenGuard, token=self.config.token, login_page=self.login_page)
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.daemon.connect()
        sampler = asyncio.create_task(self.feed.run())
        try:
            yield
        finally:
            self.feed.close()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await self.daemon.close()


FIELDS = ("code", "handler", "queue", "id", "group_code", "group_handler", "group_queue")


def _fields(form: dict[str, str]) -> dict[str, str]:
    """The selection's fields as given, to carry into the next form."""
    return {key: form[key] for key in FIELDS if form.get(key)}


def _selection(form: dict[str, str]) -> Selection:
    def one(key: str) -> tuple[str, ...]:
        value = form.get(key, "").strip()
        return (value,) if value else ()

    group = None
    if form.get("group_queue"):
        group = (
            form.get("group_code") or "-",
            form.get("group_handler") or "-",
            form["group_queue"],
        )
    chosen = LetterFilter(
        codes=one("code"), handlers=one("handler"), queues=one("queue"), ids=one("id")
    )
    return Selection(chosen, group)


def create_app(config: ConsoleConfig) -> Starlette:
    return Console(config).app()
