"""schemas.codec: the msgpack codec and its limits. Pure: no RabbitMQ, no Ray."""

import contextlib
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.codec import DEFAULT_MAX_BODY_BYTES, CodecLimits, DecodeError, TooLarge, decode, encode

# Values msgpack carries and gives back equal: no tuples (they come back as lists), no NaN
# (never equal to itself). Map keys are str, as on the wire, or int (allowed by the decoder).
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
msgpack_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-1000, 1000), children, max_size=5)
    ),
    max_leaves=30,
)

# Small limits so that random bytes reach every refusal: size, depth and container count.
TINY = CodecLimits(max_body_bytes=64, max_depth=3, max_containers=6)


def nested_lists(depth: int) -> bytes:
    """`depth` arrays, each holding the next: [[[...[]...]]]."""
    return b"\x91" * (depth - 1) + b"\x90"


def nested_maps(depth: int) -> bytes:
    """`depth` maps, each {"k": next}, the innermost empty."""
    return b"\x81\xa1k" * (depth - 1) + b"\x80"


# -- round trip --------------------------------------------------------------------------------


@given(msgpack_values)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(value: Any) -> None:
    assert decode(encode(value)) == value


@given(st.binary())
def test_bytes_stay_bytes_and_str_stays_str(blob: bytes) -> None:
    decoded = decode(encode({"b": blob, "s": "text"}))
    assert type(decoded["b"]) is bytes
    assert decoded["b"] == blob
    assert type(decoded["s"]) is str


def test_nan_round_trips_as_nan() -> None:
    assert math.isnan(decode(encode(float("nan"))))


def test_a_task_body_round_trips() -> None:
    body = {
        "v": 1,
        "id": "t-1",
        "type": "inference",
        "handler": "echo",
        "args": {"x": [1, 2.5, None, True, b"\x00\x01"]},
        "resources": {"cpus": 0.5, "gpus": 0, "memory_mb": 256},
        "priority": 9,
    }
    assert decode(encode(body)) == body


def test_encode_refuses_what_msgpack_cannot_carry() -> None:
    with pytest.raises(TypeError):
        encode({"x": object()})


# -- size --------------------------------------------------------------------------------------


def test_body_over_the_limit_is_too_large_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the body was decoded although it is over the limit")

    monkeypatch.setattr(msgpack, "unpackb", must_not_decode)
    limits = CodecLimits(max_body_bytes=10)
    with pytest.raises(TooLarge) as info:
        decode(b"\x00" * 11, limits)
    assert info.value.size == 11
    assert info.value.limit == 10
    assert "11" in str(info.value) and "10" in str(info.value)


def test_body_at_the_limit_is_decoded() -> None:
    body = encode("x" * 20)
    assert decode(body, CodecLimits(max_body_bytes=len(body))) == "x" * 20
    with pytest.raises(TooLarge):
        decode(body, CodecLimits(max_body_bytes=len(body) - 1))


def test_too_large_is_a_decode_error() -> None:
    # Callers that catch DecodeError alone must still catch TooLarge.
    assert issubclass(TooLarge, DecodeError)
    assert issubclass(DecodeError, ValueError)


def test_default_limit_is_8_mib() -> None:
    assert CodecLimits().max_body_bytes == DEFAULT_MAX_BODY_BYTES == 8 * 1024 * 1024


# -- malformed bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(encode({"a": [1, 2, 3]})[:-1], id="truncated-map"),
        pytest.param(encode("hello")[:3], id="truncated-str"),
        pytest.param(b"\xdc\x00\x05\x01", id="array-header-promises-more"),
        pytest.param(encode(1) + encode(2), id="extra-data"),
        pytest.param(encode({"a": 1}) + b"\x00", id="trailing-byte"),
        pytest.param(b"\x81\x91\x01\x02", id="unhashable-map-key"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-longer-than-body"),
    ],
)
def test_malformed_bytes_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xa2\xff\xfe", id="str"),
        pytest.param(b"\x81\xa1k\xa2\xc3\x28", id="str-in-map-value"),
        pytest.param(b"\x81\xa2\xed\xa0\x01", id="surrogate-as-map-key"),
    ],
)
def test_invalid_utf8_in_a_str_is_refused(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(body)


def test_invalid_utf8_in_bin_is_fine() -> None:
    # bin carries arbitrary bytes: only str must be UTF-8.
    assert decode(b"\xc4\x02\xff\xfe") == b"\xff\xfe"


@given(st.binary(max_size=256))
@settings(max_examples=500)
@example(b"\xdc\xff\xff" + b"\x90" * 64)
@example(nested_lists(5))
@example(b"\xc7\x01\xff\x00")  # ext -1 (timestamp) of a wrong length
def test_fuzz_only_decode_error_escapes(body: bytes) -> None:
    for limits in (CodecLimits(), TINY):
        with contextlib.suppress(DecodeError):  # anything else fails the test
            decode(body, limits)


@given(msgpack_values, st.data())
@settings(max_examples=300)
def test_fuzz_mutated_valid_bodies_only_raise_decode_error(value: Any, data: st.DataObject) -> None:
    body = bytearray(encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    for candidate in (bytes(body), bytes(body[:cut])):
        for limits in (CodecLimits(), TINY):
            with contextlib.suppress(DecodeError):
                decode(candidate, limits)


# -- depth -------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [nested_lists, nested_maps], ids=["lists", "maps"])
def test_nesting_up_to_max_depth_is_accepted(build: Any) -> None:
    limits = CodecLimits(max_depth=8)
    value = decode(build(8), limits)
    depth = 0
    while isinstance(value, list | dict):
        depth += 1
        value = next(iter(value.values() if isinstance(value, dict) else value), None)
    assert depth == 8


@pytest.mark.parametrize("build", [nested_lists, nested_maps], ids=["lists", "maps"])
def test_nesting_deeper_than_max_depth_is_refused(build: Any) -> None:
    with pytest.raises(DecodeError, match="deeper"):
        decode(build(9), CodecLimits(max_depth=8))


def test_depth_counts_the_deepest_branch_not_the_first() -> None:
    # [[], [], [[[]]]]: depth 4 on the last branch only; many shallow siblings first.
    value = [[] for _ in range(10)] + [[[[]]]]
    body = encode(value)
    assert decode(body, CodecLimits(max_depth=4)) == value
    with pytest.raises(DecodeError):
        decode(body, CodecLimits(max_depth=3))


def nesting(value: Any) -> int:
    """The depth of containers, by the definition: 0 for a scalar."""
    if isinstance(value, dict):
        return 1 + max((nesting(child) for child in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((nesting(child) for child in value), default=0)
    return 0


nested = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=40,
)


@settings(max_examples=300)
@given(value=nested, max_depth=st.integers(1, 8))
def test_depth_is_refused_exactly_past_max_depth(value: Any, max_depth: int) -> None:
    limits = CodecLimits(max_depth=max_depth)
    body = encode(value)
    if nesting(value) > max_depth:
        with pytest.raises(DecodeError, match="deeper"):
            decode(body, limits)
    else:
        assert decode(body, limits) == value


def test_mixed_map_and_list_nesting_is_counted() -> None:
    value = {"a": [{"b": [{"c": []}]}]}  # depth 6
    assert decode(encode(value), CodecLimits(max_depth=6)) == value
    with pytest.raises(DecodeError):
        decode(encode(value), CodecLimits(max_depth=5))


def test_default_depth_refuses_very_deep_nesting() -> None:
    with pytest.raises(DecodeError):
        decode(nested_lists(CodecLimits().max_depth + 1))
    with pytest.raises(DecodeError):
        decode(nested_lists(5000))  # deeper than msgpack's own stack: still a DecodeError


# -- container budget --------------------------------------------------------------------------

BOMB = b"\xdc\xff\xff" + b"\x90" * 65535  # one array of 65535 empty arrays: 65536 containers


def test_container_bomb_is_refused_below_its_count() -> None:
    with pytest.raises(DecodeError, match="too many"):
        decode(BOMB, CodecLimits(max_containers=1000))


def test_container_bomb_within_budget_decodes() -> None:
    value = decode(BOMB, CodecLimits(max_containers=65536))
    assert len(value) == 65535
    assert all(item == [] for item in value)


def test_container_bomb_of_maps_is_refused() -> None:
    bomb = b"\xdc\xff\xff" + b"\x80" * 65535
    with pytest.raises(DecodeError):
        decode(bomb, CodecLimits(max_containers=100))


def test_container_budget_is_exact() -> None:
    body = encode([[], {}, []])  # 4 containers
    assert decode(body, CodecLimits(max_containers=4)) == [[], {}, []]
    with pytest.raises(DecodeError):
        decode(body, CodecLimits(max_containers=3))


def test_budget_is_per_call() -> None:
    limits = CodecLimits(max_containers=2)
    for _ in range(5):
        assert decode(encode([[]]), limits) == [[]]
