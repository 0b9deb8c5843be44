"""Alerts and dashboard: the rules pass promtool's check and unit tests, every metric they and
the Grafana dashboard query is one a live daemon exports, and the metrics made for them (the
oldest waiting task per queue, dead letters by code) count what they say."""

import asyncio
import datetime
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import DaemonFactory, have_tool, missing_requirement, when_waiting
from raw import RawProducer, task
from test_metrics import Samples, scrape_until, value

from broker.ops.waiting_age import oldest_waiting, waiting_age_s
from broker.tasks.delivery import Delivery

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "swarm.json"
DIAGNOSTICS = ["workers.diagnostics"]
TRAINING, INFERENCE = "swarm.tasks.training", "swarm.tasks.inference"


# -- promtool ------------------------------------------------------------------------------------
def promtool(*args: str) -> None:
    if not have_tool("promtool"):
        missing_requirement("promtool not on PATH: apt-get install prometheus (scripts/setup.sh)")
    run = subprocess.run(
        ["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"


def test_promtool_checks_the_alert_rules() -> None:
    promtool("check", "rules", str(ALERTS.relative_to(ROOT)))


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    promtool("test", "rules", str(ALERT_TESTS.relative_to(ROOT)))


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_says_what_to_do_and_is_tested_firing_and_silent() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "SwarmBacklogOld",
        "SwarmDeadLettersGrowing",
        "SwarmWorkerLost",
        "SwarmQueueWithoutConsumer",
        "SwarmRunLatencyHigh",
        "SwarmDaemonNotReady",
    } <= names
    for rule in rules:
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert fires == names, "each alert has a case where it fires"
    assert silent == names, "each alert has a case where it must not fire"


# -- metric names in the queries -------------------------------------------------------------------
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label
    matchers, ranges, grouping clauses and function calls are set aside."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def test_metric_names_are_found_in_queries() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (type, le) (rate(swarm_task_run_seconds_bucket{pool=~"$p"}'
        "[$__rate_interval]))) > 300 and on (queue) max by (queue) (swarm_queue_depth) > 0"
    )
    assert metric_names(expr) == {"swarm_task_run_seconds_bucket", "swarm_queue_depth"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    queries = [t["expr"] for panel in panels for t in panel.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        definition = variable.get("definition", "")
        selected = re.match(r"\s*label_values\(\s*([^,)]+)", definition)
        if selected:
            queries.append(selected.group(1))
    return queries


def test_the_dashboard_shows_what_the_operators_need() -> None:
    used = set().union(*map(metric_names, dashboard_queries()))
    assert {
        "swarm_tasks_finished_total",
        "swarm_task_queued_seconds_bucket",
        "swarm_task_run_seconds_bucket",
        "swarm_tasks_in_flight",
        "swarm_pool_actors",
        "swarm_queue_oldest_waiting_seconds",
        "swarm_queue_depth",
        "swarm_dead_letters_total",
        "swarm_held_bytes",
    } <= used


def sample_names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def finished(samples: Samples, task_type: str) -> float:
    """Tasks of a type answered and settled, whatever their status and pool."""
    return sum(
        count
        for (name, labels), count in samples.items()
        if name == "swarm_tasks_finished_total" and ("type", task_type) in labels
    )


async def test_alerts_and_dashboard_query_only_exported_metrics_and_dead_letters_count_by_code(
    start_daemon: DaemonFactory, producer: RawProducer
) -> None:
    daemon = await start_daemon(metrics_interval_s=0.2)
    port = daemon.metrics_port
    assert port is not None
    inbox, dead = await producer.inbox(), await producer.watch_dead()
    await producer.publish("inference", task(args="fine"), reply_to=inbox.name)
    await producer.publish("inference", task(handler="no_such_handler"), reply_to=inbox.name)
    replies = await inbox.wait_for(2)
    assert sorted(r.payload["status"] for r in replies) == ["error", "ok"]
    letter = await dead.one()
    assert letter.headers["x-swarm-error-code"] == "unknown_handler"
    # The counters go up once each outcome is settled (its reply, its letter confirmed), which
    # may be after the producer has its reply; the gauges on the refresh.
    samples = await scrape_until(
        port,
        lambda s: (
            finished(s, "inference") == 2
            and value(s, "swarm_dead_letters_total", code="unknown_handler") == 1
            and value(s, "swarm_queue_consumers", queue=INFERENCE) is not None
            and value(s, "swarm_queue_oldest_waiting_seconds", queue=INFERENCE) is not None
        ),
    )
    assert finished(samples, "inference") == 2
    assert value(samples, "swarm_dead_letters_total", code="unknown_handler") == 1
    assert value(samples, "swarm_dead_letters_total", code="handler_error") == 0
    assert value(samples, "swarm_queue_consumers", queue=INFERENCE) == 1  # this daemon
    assert value(samples, "swarm_queue_consumers", queue="swarm.dead") is None
    assert value(samples, "swarm_ready") == 1
    exported = sample_names(samples)

    queried = {
        f"alerts.yml {rule['alert']}": metric_names(str(rule["expr"])) for rule in alert_rules()
    }
    queried.update({f"swarm.json {expr}": metric_names(expr) for expr in dashboard_queries()})
    assert all(queried.values()), "every query selects a metric"
    missing = {where: names - exported for where, names in queried.items() if names - exported}
    assert not missing, f"queried, not exported: {missing}"


# -- the oldest waiting task ----------------------------------------------------------------------
def delivery(received_at_s: float, **properties: Any) -> Delivery:
    return Delivery(b"", TRAINING, "training", properties, False, received_at_s)


def test_waiting_age_starts_at_the_producers_timestamp_else_at_arrival() -> None:
    now = 1_700_000_000.0
    stamped = datetime.datetime.fromtimestamp(now - 90, datetime.timezone.utc)
    assert waiting_age_s(delivery(500.0, timestamp=stamped), now, 510.0) == 90
    naive = stamped.replace(tzinfo=None)  # AMQP timestamps are UTC
    assert waiting_age_s(delivery(500.0, timestamp=naive), now, 510.0) == 90
    ahead = datetime.datetime.fromtimestamp(now + 60, datetime.timezone.utc)
    assert waiting_age_s(delivery(500.0, timestamp=ahead), now, 510.0) == 0  # clamped
    assert waiting_age_s(delivery(500.0), now, 510.0) == 10  # no timestamp: since arrival
    waiting = [
        (TRAINING, delivery(505.0)),
        (TRAINING, delivery(501.0)),
        (None, delivery(400.0)),  # no queue
        (TRAINING, object()),  # not a delivery
    ]
    ages = oldest_waiting(waiting, [TRAINING, INFERENCE], now, 510.0)
    assert ages == {TRAINING: 9.0, INFERENCE: 0.0}


async def test_oldest_waiting_shows_a_task_waiting_for_room_then_zero(
    start_daemon: DaemonFactory, producer: RawProducer, tmp_path: Path
) -> None:
    daemon = await start_daemon(handler_modules=DIAGNOSTICS, metrics_interval_s=0.2)
    port = daemon.metrics_port
    assert port is not None
    gate = tmp_path / "gate"
    inbox = await producer.inbox()
    waiting = when_waiting(daemon, 1)
    # The pool's one actor holds one training task: the blocker runs, the second waits.
    await producer.publish(
        "training", task("training", "wait_file", {"path": str(gate)}), reply_to=inbox.name
    )
    sent_at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=120)
    await producer.publish(
        "training", task("training", "echo", "queued"), reply_to=inbox.name, timestamp=sent_at
    )
    await asyncio.wait_for(waiting.wait(), 60)

    samples = await scrape_until(
        port, lambda s: (value(s, "swarm_queue_oldest_waiting_seconds", queue=TRAINING) or 0) > 0
    )
    # Its age counts from the producer's timestamp (whole seconds), not from its arrival.
    assert (value(samples, "swarm_queue_oldest_waiting_seconds", queue=TRAINING) or 0) >= 120
    assert value(samples, "swarm_queue_oldest_waiting_seconds", queue=INFERENCE) == 0

    gate.touch()
    await inbox.wait_for(2)
    samples = await scrape_until(
        port, lambda s: value(s, "swarm_queue_oldest_waiting_seconds", queue=TRAINING) == 0
    )
    assert value(samples, "swarm_queue_oldest_waiting_seconds", queue=TRAINING) == 0
