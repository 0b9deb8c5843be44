"""The handler registry: only functions registered here ever run.

A handler is marked with `@handler(...)` in an ordinary module; `load_handlers()` imports the
modules named in configuration and collects the marked functions. Nothing named in a message is
ever imported: a message can only pick among what was loaded at start.
"""

import importlib
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from schemas.topology import TASK_TYPES
from workers.errors import HandlerConfigError

_MARK = "__swarm_handler__"
BUILTIN_MODULE = "workers.builtin"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class HandlerSpec:
    name: str
    func: Callable[[Any], Any]
    task_types: frozenset[str]
    is_async: bool
    # False for sync handlers so quick they are cheaper inline than on a thread (echo).
    blocking: bool = True
    # Batch handlers take a list of args and return a list of results (workers/batching.py).
    batch_max: int | None = None
    batch_wait_s: float = 0.0
    # A pydantic model the args are validated into (from the first parameter's annotation;
    # `list[Model]` for batch handlers). Args that do not fit are answered `invalid`.
    args_model: type[BaseModel] | None = None
    # The handler takes a second parameter: a workers.context.TaskContext (ActorContext for
    # batch handlers, whose one call serves many tasks).
    wants_context: bool = False
    # Called once per actor, before the first run (workers/context.py: its result is
    # `ctx.state`); handlers naming the same setup share its result.
    setup: Callable[[Any], Any] | None = None

    @property
    def can_report_progress(self) -> bool:
        """Gets a TaskContext, whose `progress()` reaches the producer. A batch handler's
        context is the actor's (one call serves many tasks): it reports none."""
        return self.wants_context and self.batch_max is None

    @property
    def shares_calls(self) -> bool:
        """Its runs for one actor may travel in one Ray call (workers/coalescing.py): inline
        runs return at once, and a batch handler's runs wait for each other anyway."""
        return self.is_inline or self.batch_max is not None

    @property
    def is_inline(self) -> bool:
        """Runs on the actor's event loop and returns at once: no thread, no batch, no await."""
        return (
            not self.is_async
            and not self.blocking
            and self.batch_max is None
            and not self.wants_context
            and self.args_model is None
        )


def handler(
    name: str | None = None,
    *,
    types: Iterable[str] = TASK_TYPES,
    blocking: bool = True,
    batch_max: int | None = None,
    batch_wait_ms: float = 5.0,
    setup: Callable[[Any], Any] | None = None,
) -> Callable[[F], F]:
    """Mark a function as a Swarm handler for the given task types (all three by default).

    A sync handler runs on a thread unless `blocking=False` says it returns at once. With
    `batch_max`, the function takes a list of args and returns a list of results: runs that
    arrive within `batch_wait_ms` of each other (up to `batch_max`) go to it as one call.

    The first parameter annotated with a pydantic model (`list[Model]` for batch handlers)
    gets the args validated into it. A second parameter gets a workers.context object.
    `setup(actor_context)` runs once per actor before the first run (sync ones on a thread):
    load a model there, and read it as `ctx.state`.
    """
    if batch_max is not None and batch_max < 1:
        raise HandlerConfigError(f"batch_max must be at least 1, got {batch_max}")
    if batch_wait_ms < 0:
        raise HandlerConfigError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
    task_types = frozenset(types)
    unknown = task_types - set(TASK_TYPES)
    if unknown or not task_types:
        raise HandlerConfigError(
            f"handler task types must be a non-empty subset of {TASK_TYPES}, got {sorted(types)}"
        )

    def mark(func: F) -> F:
        args_model, wants_context = _inspect_signature(func, batch=batch_max is not None)
        spec = HandlerSpec(
            name=name or func.__name__,
            func=func,
            task_types=task_types,
            is_async=inspect.iscoroutinefunction(func),
            blocking=blocking,
            batch_max=batch_max,
            batch_wait_s=batch_wait_ms / 1000.0,
            args_model=args_model,
            wants_context=wants_context,
            setup=setup,
        )
        setattr(func, _MARK, spec)
        return func

    return mark


def _inspect_signature(func: Callable[..., Any], *, batch: bool) -> tuple[Any, bool]:
    """The args model (if the first parameter is annotated with one) and whether the handler
    takes a context, read once at registration."""
    parameters = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not parameters or len(parameters) > 2:
        raise HandlerConfigError(
            f"handler {func.__name__!r} must take (args) or (args, ctx), "
            f"not {len(parameters)} positional parameters"
        )
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise HandlerConfigError(
            f"handler {func.__name__!r}: its annotations cannot be resolved: {exc}"
        ) from exc
    annotation = hints.get(parameters[0].name)
    if batch and typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation) or (None,)
    model = (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )
    return model, len(parameters) == 2


class HandlerRegistry:
    """Handlers by name. Lookups are by exact name; there is no fallback."""

    def __init__(self, specs: Iterable[HandlerSpec] = ()) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: HandlerSpec) -> None:
        existing = self._specs.get(spec.name)
        if existing is not None and existing.func is not spec.func:
            raise HandlerConfigError(
                f"handler {spec.name!r} is registered twice "
                f"({_where(existing.func)} and {_where(spec.func)}); rename one"
            )
        self._specs[spec.name] = spec

    def get(self, name: str) -> HandlerSpec | None:
        return self._specs.get(name)

    def serves(self, name: str, task_type: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and task_type in spec.task_types

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def load_handlers(modules: Iterable[str]) -> HandlerRegistry:
    """Import the built-ins and each named module; collect every marked function."""
    registry = HandlerRegistry()
    for module_name in [BUILTIN_MODULE, *modules]:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or anything its top-level code raised
            raise HandlerConfigError(
                f"cannot import handler module {module_name!r}: {exc}; "
                "check SWARM_HANDLER_MODULES and that the module is installed on every Ray node"
            ) from exc
        for value in vars(module).values():
            spec = getattr(value, _MARK, None)
            if isinstance(spec, HandlerSpec):
                registry.add(spec)
    return registry


def _where(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"
