"""The operator console (`swarm console`) in a real browser, against a real daemon, RabbitMQ
and Ray; and the `task` control request it looks tasks up with."""

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from conftest import (
    DaemonFactory,
    missing_requirement,
    until,
    until_journaled,
    when_waiting,
)
from raw import RawProducer, task
from typer.testing import CliRunner

from broker.cli.root import app
from broker.daemon import Daemon
from broker.producer.client import SwarmClient
from schemas.topology import DEAD_QUEUE

try:
    from playwright.async_api import expect
except ImportError:  # chromium() says so, per test
    expect = None  # type: ignore[assignment]

DIAGNOSTICS = ["workers.diagnostics"]


# -- the `task` control request ------------------------------------------------------------------
async def test_task_lookup_says_waiting_running_done_or_unknown(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    journal, gate = tmp_path / "runs", tmp_path / "gate"
    waiting = when_waiting(daemon, 1)
    async with SwarmClient(amqp_url) as client:
        args = {"path": str(gate), "journal": str(journal)}
        # One CPU actor of one CPU: the second training task waits for the first.
        first = await client.send("training", "wait_file", args, task_id="looked-up-1")
        second = await client.send("training", "wait_file", args, task_id="looked-up-2")
        await until_journaled(journal, 1)
        await asyncio.wait_for(waiting.wait(), 60)
        running = await client.task("looked-up-1")
        assert running["state"] == "running" and running["id"] == "looked-up-1"
        assert (await client.task("looked-up-2"))["state"] == "waiting"
        gate.touch()
        assert (await asyncio.wait_for(first, 60)).status == "ok"
        await asyncio.wait_for(second, 60)
        done = await client.task("looked-up-1")
        assert done["state"] == "done" and done["status"] == "ok"
        assert done["reply"]["id"] == "looked-up-1" and done["reply"]["status"] == "ok"
        assert done["reply"]["result"] == (await first).result
        assert done["reply"]["pool"] == "cpu" and done["reply"]["attempts"] == 1
        unknown = await client.task("never-sent")
        assert unknown["state"] == "unknown" and unknown["cancel_remembered"] is False


# -- the console in a real browser ---------------------------------------------------------------
# Screenshots of every page the browser tests saw (docs/console.png is one of them).
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
TOKEN = "console-test-token"
# Playwright's waits (the page's own events: no fixed sleeps).
SEEN_MS = 30_000


def chromium() -> str:
    """Debian's chromium: Playwright's own browsers are never downloaded."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing_requirement(
            "chromium not on PATH: the console's browser tests need it "
            "(scripts/setup.sh installs it: apt-get install chromium)"
        )
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing_requirement("playwright not installed (the test extra: pip install -e '.[test]')")
    return path


@contextlib.asynccontextmanager
async def serving(
    daemon: Daemon, amqp_url: str, *, host: str = "127.0.0.1", **options: Any
) -> AsyncIterator[str]:
    """The console in this test's loop (uvicorn on a free port); yields its loopback URL."""
    import uvicorn

    from broker.console.app import ConsoleConfig, create_app

    config = ConsoleConfig(
        amqp_url=amqp_url,
        metrics_url=f"http://127.0.0.1:{daemon.metrics_port}/metrics",
        interval_s=0.5,
        **options,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=0,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
    )
    serve = asyncio.create_task(server.serve())
    await until(lambda: server.started or serve.done(), "the console started", 30)
    assert server.started, serve.exception()
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serve, 30)


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    path = chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(SEEN_MS)
            yield page
        finally:
            await browser.close()


async def screenshot(page: Any, name: str) -> Path:
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def _dead_lettered(daemon: Daemon, count: int) -> None:
    """Until swarm.dead confirmed `count` dead letters (the daemon's own count)."""
    assert daemon.ingress is not None
    stats = daemon.ingress.publish_stats
    await until(lambda: sum(stats.dead_letters.values()) >= count, f"{count} dead letters")


async def test_the_overview_shows_the_counts_of_tasks_just_run(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    chromium()
    daemon = await start_daemon(handler_modules=DIAGNOSTICS, metrics_interval_s=0.5)
    inbox = await producer.inbox()
    for n in range(3):
        await producer.publish(
            "inference", task("inference", "echo", {"n": n}), reply_to=inbox.name
        )
    failing = task("data_processing", "fail", {"message": "boom"})
    await producer.publish("data_processing", failing, reply_to=inbox.name)
    await inbox.wait_for(4)
    async with serving(daemon, amqp_url) as url, browser_page() as page:
        await page.goto(url + "/")
        # Drawn from the live feed (server-sent events), not from the page as first served.
        counts = page.locator("#totals tr[data-key='inference ok'] .count")
        await expect(counts).to_have_text("3")
        await expect(
            page.locator("#totals tr[data-key='data_processing error'] .count")
        ).to_have_text("1")
        await expect(page.locator("[data-chart='rates'] canvas")).to_have_count(1)
        await expect(page.locator("#now tr[data-key='cpu actors'] td").nth(1)).to_have_text("1")
        # Work flowing while the page is open: the counts and the rates follow.
        for n in range(20):
            await producer.publish(
                "inference", task("inference", "echo", {"n": n}), reply_to=inbox.name
            )
        await expect(counts).to_have_text("23")
        await expect(page.locator("#now tr[data-key='queue p99 (s)'] td").nth(1)).not_to_have_text(
            "\u2013"
        )
        await screenshot(page, "overview.png")

        await page.goto(url + "/cluster")
        cpu = page.locator("#pools tr[data-pool='cpu']")
        await expect(cpu).to_contain_text("1 (1\u20131)")
        await expect(page.locator("#nodes tbody tr")).not_to_have_count(0)
        await screenshot(page, "cluster.png")

        await page.goto(url + "/queues")
        inference = page.locator("#queues tr[data-queue='swarm.tasks.inference']")
        await expect(inference.locator(".depth")).to_have_text("0")
        await expect(inference).to_contain_text("yes")
        await expect(page.locator("#queues tr[data-queue='swarm.dead'] .depth")).to_have_text("1")
        await screenshot(page, "queues.png")


async def test_a_task_looked_up_by_id_shows_its_reply(
    start_daemon: DaemonFactory, amqp_url: str
) -> None:
    chromium()
    daemon = await start_daemon()
    async with SwarmClient(amqp_url) as client:
        reply = await client.submit(
            "inference", "echo", {"answer": 41}, task_id="console-task-1", wait_s=60
        )
    assert reply.status == "ok"
    async with serving(daemon, amqp_url) as url, browser_page() as page:
        await page.goto(url + "/tasks")
        await page.fill("#lookup input[name=id]", "console-task-1")
        await page.click("#lookup button")
        await expect(page.locator("#state")).to_have_text("done")
        await expect(page.locator("#status")).to_have_text("ok")
        await expect(page.locator("#reply")).to_contain_text('"answer": 41')
        await expect(page.locator("#task")).to_contain_text("cpu")
        await screenshot(page, "tasks.png")
        await page.goto(url + "/tasks?id=never-sent")
        await expect(page.locator("#state")).to_have_text("unknown")


async def test_a_running_task_cancelled_from_the_console_after_a_confirmation(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    chromium()
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    journal = tmp_path / "runs"
    args = {"path": str(tmp_path / "never"), "journal": str(journal)}
    async with (
        SwarmClient(amqp_url) as client,
        serving(daemon, amqp_url) as url,
        browser_page() as page,
    ):
        reply = await client.send("training", "wait_file", args, task_id="console-long")
        await until_journaled(journal, 1)  # the handler began: certainly running
        await page.goto(url + "/tasks?id=console-long")
        await expect(page.locator("#state")).to_have_text("running")
        await page.click("#cancel button")
        # Nothing cancelled yet: a page naming the task and its state, a yes and a no.
        await expect(page.locator("#confirm-state")).to_have_text("It is running.")
        await screenshot(page, "cancel_confirm.png")
        assert not reply.done()
        assert (await client.task("console-long"))["state"] == "running"
        await page.click("#confirm button")
        await expect(page.locator("#cancelled")).to_have_text("Cancel asked: running")
        answered = await asyncio.wait_for(reply, 60)
        assert answered.status == "cancelled" and answered.id == "console-long"
        await page.goto(url + "/tasks?id=console-long")
        await expect(page.locator("#state")).to_have_text("done")
        await expect(page.locator("#status")).to_have_text("cancelled")
        await expect(page.locator("#cancel")).to_have_count(0)  # nothing left to cancel


async def test_a_dead_letter_replayed_from_the_console_is_answered_ok_on_its_reply_to(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str, tmp_path: Path
) -> None:
    chromium()
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    inbox = await producer.inbox()
    # Fails its first run (no retries allowed), succeeds from the second on: "the fix".
    body = task("inference", "flaky", {"path": str(tmp_path / "runs"), "failures": 1}, id="fix-me")
    body["max_retries"] = 0
    correlation_id = await producer.publish("inference", body, reply_to=inbox.name)
    assert (await inbox.one()).payload["status"] == "error"
    await _dead_lettered(daemon, 1)
    async with serving(daemon, amqp_url) as url, browser_page() as page:
        await page.goto(url + "/dead")
        group = page.locator("#groups tr[data-code='handler_error'][data-handler='flaky']")
        await expect(group.locator(".count")).to_have_text("1")
        await screenshot(page, "dead.png")
        await group.get_by_role("link", name="letters").click()
        await page.get_by_role("link", name="fix-me").click()
        # A retry asked for and not allowed: the error says so (no traceback: nothing raised).
        await expect(page.locator("#letter")).to_contain_text("run 1 asks for another")
        await expect(page.locator("#body")).to_contain_text('"handler": "flaky"')
        await screenshot(page, "dead_letter.png")
        await page.click("#replay-letter button")
        await expect(page.locator("#chosen")).to_contain_text("fix-me")
        await screenshot(page, "dead_replay_confirm.png")
        await page.click("#confirm button")
        await expect(page.locator("#done")).to_have_text("Replayed 1 dead letter(s)")
    again = (await inbox.wait_for(2))[1]
    assert again.payload["status"] == "ok" and again.payload["id"] == "fix-me"
    assert again.payload["result"] == {"runs": 2}
    assert again.message.correlation_id == correlation_id
    queue = await producer.channel.declare_queue(DEAD_QUEUE, passive=True)
    assert queue.declaration_result.message_count == 0


async def test_a_read_only_console_offers_no_action(
    start_daemon: DaemonFactory, producer: RawProducer, amqp_url: str
) -> None:
    chromium()
    daemon = await start_daemon(handler_modules=DIAGNOSTICS)
    inbox = await producer.inbox()
    await producer.publish(
        "data_processing",
        task("data_processing", "fail", {"message": "boom"}, id="ro-1"),
        reply_to=inbox.name,
    )
    await inbox.one()
    await _dead_lettered(daemon, 1)
    async with serving(daemon, amqp_url, read_only=True) as url, browser_page() as page:
        pages = [
            "/",
            "/cluster",
            "/queues",
            "/tasks?id=ro-1",
            "/tasks?id=never-sent",
            "/dead",
            "/dead/letters",
            "/dead/letter/ro-1",
        ]
        for path in pages:
            await page.goto(url + path)
            await expect(page.locator("#read-only")).to_be_visible()
            await expect(page.locator("form[method=post]")).to_have_count(0)
            labels = await page.locator("button").all_inner_texts()
            assert set(labels) <= {"Look up", "List"}, (path, labels)
        await expect(page.locator("#traceback")).to_contain_text("HandlerFailure: boom")
        await page.goto(url + "/dead")
        await expect(page.locator("#groups .count")).to_have_text("1")
        await screenshot(page, "dead_read_only.png")
        for path in ("/dead/replay", "/dead/purge", "/tasks/cancel"):
            refused = await page.request.post(url + path, form={"id": "ro-1"})
            assert refused.status in (404, 405), (path, refused.status)
    queue = await producer.channel.declare_queue(DEAD_QUEUE, passive=True)
    assert queue.declaration_result.message_count == 1


async def test_a_console_bound_beyond_loopback_refuses_requests_without_the_token(
    start_daemon: DaemonFactory, amqp_url: str
) -> None:
    chromium()
    refused = CliRunner().invoke(
        app, ["console", "--host", "0.0.0.0"], env={"AMQP_URL": amqp_url, "SWARM_CONSOLE_TOKEN": ""}
    )
    assert refused.exit_code == 2 and "SWARM_CONSOLE_TOKEN" in refused.output
    daemon = await start_daemon()
    async with (
        serving(daemon, amqp_url, host="0.0.0.0", token=TOKEN) as url,
        browser_page() as page,
    ):
        for path in ("/", "/tasks?id=x", "/dead", "/events", "/static/console.css"):
            answer = await page.request.get(url + path)
            assert answer.status == 401, path
            wrong = await page.request.get(url + path, headers={"Authorization": "Bearer nope"})
            assert wrong.status == 401, path
        bearer = await page.request.get(
            url + "/cluster", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert bearer.status == 200
        forged = await page.request.post(
            url + "/tasks/cancel",
            form={"id": "x", "form_token": "forged"},
            headers={"Authorization": f"Bearer {TOKEN}", "Origin": url},
        )
        assert forged.status == 403
        # A person: the login form, then the pages on its cookie.
        shown = await page.goto(url + "/cluster")
        assert shown is not None and shown.status == 401
        await screenshot(page, "login.png")
        await page.fill("#login input[name=token]", "not-it")
        await page.click("#login button")
        await expect(page.locator("#error")).to_have_text("not the console's token")
        await page.fill("#login input[name=token]", TOKEN)
        await page.click("#login button")
        await expect(page.locator("#totals")).to_be_visible()
        await page.goto(url + "/cluster")
        await expect(page.locator("#pools tr[data-pool='cpu']")).to_be_visible()
        cookie = [c for c in await page.context.cookies() if c["name"] == "swarm_console"]
        assert cookie and cookie[0]["httpOnly"] and TOKEN not in cookie[0]["value"]


# -- the token middleware, without a browser ----------------------------------------------------
async def test_the_token_guard_lets_only_the_token_through() -> None:
    from broker.console.auth import COOKIE, FormGuard, TokenGuard, session_value

    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(guard: TokenGuard, path: str, **headers: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        await guard(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    guard = TokenGuard(inner, "s3cret", lambda: b"<form id=login>")
    assert (await call(guard, "/"))[0] == 401
    assert await call(guard, "/", Accept="text/html") == (401, b"<form id=login>")
    assert (await call(guard, "/", Authorization="Bearer wrong"))[0] == 401
    assert (await call(guard, "/", Authorization="Basic s3cret"))[0] == 401
    assert (await call(guard, "/", Cookie=f"{COOKIE}=s3cret"))[0] == 401  # not the token itself
    assert (await call(guard, "/", Cookie="garbage;;=;"))[0] == 401
    assert reached == []
    assert (await call(guard, "/", Authorization="Bearer s3cret"))[0] == 200
    assert (await call(guard, "/q", Cookie=f"{COOKIE}={session_value('s3cret')}"))[0] == 200
    assert (await call(guard, "/login"))[0] == 200  # the form itself is open
    assert reached == ["/", "/q", "/login"]
    open_guard = TokenGuard(inner, None, lambda: b"")
    assert (await call(open_guard, "/anything"))[0] == 200

    forms = FormGuard()
    same = {"origin": "http://console:9470"}
    assert forms.check(same, "console:9470", forms.form_token) is None
    assert forms.check({}, "console:9470", forms.form_token) is not None
    assert forms.check({"origin": "http://evil"}, "console:9470", forms.form_token) is not None
    assert (
        forms.check({"referer": "http://console:9470/dead"}, "console:9470", forms.form_token)
        is None
    )
    assert forms.check(same, "console:9470", "stale") is not None
    assert forms.check(same, "console:9470", FormGuard().form_token) is not None
