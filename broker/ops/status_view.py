"""`swarm status` as readable tables."""

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text


def _fmt(vector: dict[str, Any]) -> str:
    return f"{vector['cpus']:g} cpu  {vector['gpus']:g} gpu  {vector['memory_mb']} MB"


def render_status(answer: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(status_view(answer))


def status_view(answer: dict[str, Any], caption: str | None = None) -> RenderableType:
    """Pools, nodes and queues as tables, and the limits in force."""
    pools = Table(title="pools")
    for column in ("pool", "actors", "reserved", "free", "running", "waiting", "scale-up"):
        pools.add_column(column)
    for name, view in answer["pools"].items():
        # Older daemons do not report it; a pending scale-up is shown as the actors asked for.
        scale_up = view.get("scale_up_actors", 0)
        pools.add_row(
            name,
            str(view["actors"]),
            _fmt(view["reserved"]),
            _fmt(view["free"]),
            str(view["running"]),
            str(view["waiting"]),
            f"+{scale_up} asked" if scale_up else "-",
        )
    nodes = Table(title="nodes")
    for column in ("node", "alive", "total", "reserved", "free", "actors", "running"):
        nodes.add_column(column)
    for node in answer["nodes"]:
        nodes.add_row(
            node["node_id"][:12],
            str(node["alive"]),
            _fmt(node["total"]),
            _fmt(node["reserved"]),
            _fmt(node["free"]),
            str(node["actors"]),
            str(node["running"]),
        )
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("depth", justify="right")
    for name, depth in answer["queues"].items():
        queues.add_row(name, str(depth))
    limits = Text("limits: " + ", ".join(f"{k}={v}" for k, v in answer["limits"].items()))
    parts: list[RenderableType] = [pools, nodes, queues, limits]
    rabbitmq = answer.get("rabbitmq")  # older daemons do not report it
    if rabbitmq:
        parts.append(Text(_rabbitmq_line(rabbitmq)))
    if caption:
        parts.insert(0, Text(caption, style="dim"))
    return Group(*parts)


def _rabbitmq_line(rabbitmq: dict[str, Any]) -> str:
    node = rabbitmq.get("node") or "none (reconnecting)"
    listed = rabbitmq.get("nodes") or []
    line = f"rabbitmq: connected to {node}"
    if len(listed) > 1:
        line += f" (one of {len(listed)} nodes: {', '.join(listed)})"
    return line
