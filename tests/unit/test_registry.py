"""workers.registry: the handler decorator, the registry and module loading. Pure (no Ray)."""

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.builtin import HandlerFailure
from workers.errors import HandlerConfigError
from workers.registry import HandlerRegistry, HandlerSpec, handler, load_handlers

TYPES = ("training", "inference", "data_processing")

ModuleMaker = Callable[[str], str]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleMaker]:
    """Write a uniquely named module under tmp_path, importable; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(source: str) -> str:
        name = f"swarm_test_handlers_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()  # the path finder caches directory listings
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


def spec_of(func: Any) -> HandlerSpec:
    spec = getattr(func, "__swarm_handler__", None)
    assert isinstance(spec, HandlerSpec)
    return spec


# -- built-ins ---------------------------------------------------------------------------------


def test_builtins_load_for_every_type() -> None:
    registry = load_handlers([])
    assert {"echo", "sleep", "fail"} <= set(registry.names())
    for name in ("echo", "sleep", "fail"):
        for task_type in TYPES:
            assert registry.serves(name, task_type), (name, task_type)


def test_builtin_kinds() -> None:
    registry = load_handlers([])
    echo, sleep, fail = (registry.get(n) for n in ("echo", "sleep", "fail"))
    assert echo is not None and sleep is not None and fail is not None
    assert not echo.is_async and not echo.blocking
    assert sleep.is_async
    assert not fail.is_async


async def test_builtins_behave_as_documented() -> None:
    registry = load_handlers([])
    echo, sleep, fail = (registry.get(n) for n in ("echo", "sleep", "fail"))
    assert echo is not None and sleep is not None and fail is not None
    args = {"seconds": 0, "x": [1, 2]}
    assert echo.func(args) is args
    assert await sleep.func(args) is args
    with pytest.raises(ValueError):
        await sleep.func({"seconds": -1})
    with pytest.raises(ValueError):
        await sleep.func({"seconds": True})
    with pytest.raises(HandlerFailure, match="boom"):
        fail.func({"message": "boom"})


def test_unknown_names_are_not_served() -> None:
    registry = load_handlers([])
    assert registry.get("os.system") is None
    assert not registry.serves("os.system", "training")
    assert not registry.serves("echo", "no_such_type")


# -- the decorator -----------------------------------------------------------------------------


def test_decorator_defaults() -> None:
    @handler()
    def resize(args: Any) -> Any:
        return args

    spec = spec_of(resize)
    assert spec.name == "resize"
    assert spec.func is resize
    assert spec.task_types == frozenset(TYPES)
    assert spec.is_async is False
    assert spec.blocking is True
    assert resize(3) == 3  # the function itself is returned, still callable


def test_decorator_explicit_name_and_blocking() -> None:
    @handler("img.resize", blocking=False)
    def resize(args: Any) -> Any:
        return args

    spec = spec_of(resize)
    assert spec.name == "img.resize"
    assert spec.blocking is False


def test_async_function_is_detected() -> None:
    @handler()
    async def infer(args: Any) -> Any:
        return args

    assert spec_of(infer).is_async is True


def test_handler_restricted_to_one_type_serves_only_that_type() -> None:
    @handler("only_inference", types=["inference"])
    def only(args: Any) -> Any:
        return args

    registry = HandlerRegistry([spec_of(only)])
    assert registry.serves("only_inference", "inference")
    assert not registry.serves("only_inference", "training")
    assert not registry.serves("only_inference", "data_processing")


@pytest.mark.parametrize(
    "types",
    [
        pytest.param(["trainin"], id="typo"),
        pytest.param(["training", "gpu"], id="one-bad"),
        pytest.param([], id="empty"),
        pytest.param("training", id="str-not-list"),
    ],
)
def test_bad_task_types_raise(types: Any) -> None:
    with pytest.raises(HandlerConfigError):
        handler("h", types=types)


# -- the registry ------------------------------------------------------------------------------


def test_duplicate_name_from_different_functions_raises() -> None:
    @handler("dup")
    def first(args: Any) -> Any:
        return 1

    @handler("dup")
    def second(args: Any) -> Any:
        return 2

    registry = HandlerRegistry([spec_of(first)])
    with pytest.raises(HandlerConfigError, match="dup") as info:
        registry.add(spec_of(second))
    assert "first" in str(info.value) and "second" in str(info.value)
    got = registry.get("dup")
    assert got is not None and got.func is first


def test_same_function_twice_is_one_handler() -> None:
    @handler()
    def once(args: Any) -> Any:
        return args

    registry = HandlerRegistry([spec_of(once), spec_of(once)])
    assert len(registry) == 1
    assert registry.names() == ["once"]


# -- loading modules ---------------------------------------------------------------------------


def test_load_module_collects_marked_functions_only(make_module: ModuleMaker) -> None:
    name = make_module(
        """
        from workers.registry import handler

        @handler("resize", types=["data_processing"])
        def resize(args):
            return args

        @handler()
        async def infer(args):
            return args

        def helper(args):
            return args
        """
    )
    registry = load_handlers([name])
    assert set(registry.names()) == {"echo", "sleep", "fail", "resize", "infer"}
    assert registry.serves("resize", "data_processing")
    assert not registry.serves("resize", "inference")
    infer = registry.get("infer")
    assert infer is not None and infer.is_async
    assert registry.get("helper") is None


def test_duplicate_names_across_modules_raise(make_module: ModuleMaker) -> None:
    source = """
        from workers.registry import handler

        @handler("shared")
        def shared(args):
            return args
        """
    first, second = make_module(source), make_module(source)
    with pytest.raises(HandlerConfigError, match="shared"):
        load_handlers([first, second])


def test_a_module_cannot_take_a_builtin_name(make_module: ModuleMaker) -> None:
    name = make_module(
        """
        from workers.registry import handler

        @handler("echo")
        def my_echo(args):
            return "not an echo"
        """
    )
    with pytest.raises(HandlerConfigError, match="echo"):
        load_handlers([name])


def test_reexported_handler_is_not_a_duplicate(make_module: ModuleMaker) -> None:
    original = make_module(
        """
        from workers.registry import handler

        @handler("ping")
        def ping(args):
            return "pong"
        """
    )
    reexport = make_module(f"from {original} import ping\nfrom workers.builtin import echo\n")
    registry = load_handlers([original, reexport])
    got = registry.get("ping")
    assert got is not None and got.func(None) == "pong"


def test_missing_module_raises_naming_it() -> None:
    missing = f"swarm_no_such_module_{uuid.uuid4().hex}"
    with pytest.raises(HandlerConfigError, match=missing) as info:
        load_handlers([missing])
    assert isinstance(info.value.__cause__, ImportError)


def test_module_with_a_missing_dependency_raises_naming_it(make_module: ModuleMaker) -> None:
    name = make_module("import swarm_definitely_not_installed_dependency\n")
    with pytest.raises(HandlerConfigError, match=name):
        load_handlers([name])


@pytest.mark.parametrize(
    "source", ["def broken(:\n", "raise RuntimeError('no GPU here')\n"], ids=["syntax", "runtime"]
)
def test_module_failing_at_import_raises_config_error(
    make_module: ModuleMaker, source: str
) -> None:
    name = make_module(source)
    with pytest.raises(HandlerConfigError, match=name):
        load_handlers([name])


def test_only_single_run_handlers_with_a_context_report_progress() -> None:
    from workers.context import ActorContext, TaskContext

    @handler("with_ctx")
    def with_ctx(args: Any, ctx: TaskContext) -> Any:
        return args

    @handler("batch_with_ctx", batch_max=8)
    def batch_with_ctx(items: list[Any], ctx: ActorContext) -> list[Any]:
        return items

    @handler("plain")
    def plain(args: Any) -> Any:
        return args

    specs = {f.__name__: f.__swarm_handler__ for f in (with_ctx, batch_with_ctx, plain)}
    assert specs["with_ctx"].can_report_progress
    assert not specs["batch_with_ctx"].can_report_progress, "its context is the actor's"
    assert not specs["plain"].can_report_progress
