"""Opt-in diagnostic handlers for smoke tests and fault drills; load them with
SWARM_HANDLER_MODULES=workers.diagnostics. Never loaded by default: `crash` ends its actor."""

import asyncio
import os
import time
from typing import Any

from pydantic import BaseModel

from workers.context import ActorContext, TaskContext
from workers.registry import handler
from workers.signals import Retry

_arrivals: dict[str, int] = {}
_arrived = asyncio.Condition()


@handler("barrier")
async def barrier(args: Any) -> Any:
    """Wait until `args.parties` runs of the same `args.name` are inside this actor at once;
    fail after `args.timeout_s`. Proves concurrency by an event, not by timing."""
    name, parties = str(args["name"]), int(args["parties"])
    async with _arrived:
        _arrivals[name] = _arrivals.get(name, 0) + 1
        _arrived.notify_all()
        await asyncio.wait_for(
            _arrived.wait_for(lambda: _arrivals[name] >= parties), float(args.get("timeout_s", 30))
        )
    return {"name": name, "parties": parties}


@handler("crash")
def crash(args: Any) -> Any:
    """End the actor's process at once, as a segfault or OOM kill would."""
    os._exit(1)


@handler("pid", blocking=False)
def pid(args: Any) -> Any:
    """The actor's process id and the devices Ray gave it."""
    return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@handler("crash_once")
def crash_once(args: Any) -> Any:
    """End the actor the first time (creating `args.marker`); succeed on the retry. Shows a
    retry landing on a fresh actor."""
    marker = str(args["marker"])
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return {"retried": True, "pid": os.getpid()}
    os._exit(1)


_occupancy = {"now": 0, "max": 0}


@handler("occupancy")
async def occupancy(args: Any) -> Any:
    """Hold a slot for `args.seconds`; report how many runs this actor held at once at most."""
    _occupancy["now"] += 1
    _occupancy["max"] = max(_occupancy["max"], _occupancy["now"])
    try:
        await asyncio.sleep(float(args.get("seconds", 0.1)))
    finally:
        _occupancy["now"] -= 1
    return {"max": _occupancy["max"], "pid": os.getpid()}


@handler("wait_file")
async def wait_file(args: Any) -> Any:
    """Return once the file `args.path` exists: a gate a test opens when it is ready.

    With `args.journal`, each run appends `started <pid>` to that file as it begins and
    `finished <pid>` as it returns: a test counts real runs, and sees one begin."""
    path = str(args["path"])
    journal = args.get("journal")
    if journal is not None:
        _journal(str(journal), "started")
    while not await asyncio.to_thread(os.path.exists, path):  # noqa: ASYNC110 - across processes
        await asyncio.sleep(0.01)
    if journal is not None:
        _journal(str(journal), "finished")
    return {"path": path}


def _journal(path: str, event: str) -> None:
    """One line, appended in one write: runs in several actors may share the file."""
    with open(path, "a") as log:
        log.write(f"{event} {os.getpid()}\n")


@handler("journal")
def journal(args: Any) -> Any:
    """Append `args.entry` to the file `args.path` (one line per run): counts real runs."""
    with open(str(args["path"]), "a") as log:
        log.write(f"{args.get('entry', 'run')}\n")
    return args.get("entry", "run")


@handler("flaky")
def flaky(args: Any) -> Any:
    """Ask for a retry (workers.signals.Retry) the first `args.failures` runs, then succeed;
    runs are counted in the file `args.path`."""
    path = str(args["path"])
    with open(path, "a+") as log:
        log.seek(0)
        runs = len(log.readlines())
        log.write("run\n")
    if runs < int(args["failures"]):
        raise Retry(float(args.get("delay_s", 0.01)), f"run {runs + 1} asks for another")
    return {"runs": runs + 1}


@handler("block")
def block(args: Any) -> Any:
    """Block the thread for `args.seconds`: a sync handler no time limit can interrupt."""
    time.sleep(float(args["seconds"]))
    return {"pid": os.getpid()}


@handler("batch_echo", batch_max=16, batch_wait_ms=50)
async def batch_echo(items: list[Any]) -> list[Any]:
    """A batch handler: each result carries the size of the batch its item ran in."""
    return [{"item": item, "batch": len(items)} for item in items]


# -- the handler SDK, exercised ---------------------------------------------------------------
class Point(BaseModel):
    x: float
    y: float


@handler("typed_norm")
def typed_norm(point: Point) -> Any:
    """Typed args: `point` arrives validated; args that do not fit are answered `invalid`."""
    return {"norm": (point.x**2 + point.y**2) ** 0.5, "model": type(point).__name__}


def _count_setup(actor: ActorContext) -> Any:
    """A stand-in for loading a model: how often it ran in this process, and where."""
    _setups_run.append(actor.pool)
    return {"loaded_in": os.getpid(), "setups_in_this_actor": len(_setups_run)}


_setups_run: list[str] = []


@handler("with_setup", setup=_count_setup)
def with_setup(args: Any, ctx: TaskContext) -> Any:
    return {
        "state": ctx.state,
        "pid": os.getpid(),
        "task_id": ctx.task_id,
        "task_type": ctx.task_type,
        "attempt": ctx.attempt,
        "gpu_ids": list(ctx.gpu_ids),
        "device": ctx.device,
        "pool": ctx.pool,
    }


@handler("steps")
def steps(args: Any, ctx: TaskContext) -> Any:
    """Reports `args.steps` progress messages from a thread, then returns."""
    for step in range(1, int(args["steps"]) + 1):
        ctx.progress({"step": step, "of": int(args["steps"])})
    return {"done": int(args["steps"])}


@handler("async_steps")
async def async_steps(args: Any, ctx: TaskContext) -> Any:
    for step in range(1, int(args["steps"]) + 1):
        ctx.progress({"step": step})
        await asyncio.sleep(0)
    return {"done": int(args["steps"])}


@handler("batch_typed", batch_max=8, batch_wait_ms=50, setup=_count_setup)
def batch_typed(points: list[Point], ctx: ActorContext) -> list[Any]:
    """A typed batch handler with a set-up: one call, one state, many tasks."""
    return [{"sum": p.x + p.y, "batch": len(points), "state": ctx.state} for p in points]
