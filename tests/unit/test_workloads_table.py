"""workers.workloads.table: columns from records, filtered grouped aggregates."""

import math
import statistics
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.workloads.table import aggregate, to_columns

SALES = [
    {"region": "north", "product": "pen", "units": 3, "price": 2.5},
    {"region": "south", "product": "pen", "units": 5, "price": 1.0},
    {"region": "north", "product": "ink", "units": 1, "price": 8.0},
    {"region": "north", "product": "pen", "units": 7, "price": 2.0},
    {"region": "south", "product": "ink", "units": 2, "price": 9.5},
    {"region": "east", "product": "pen", "units": 4, "price": 3.0},
]


def test_aggregates_by_hand() -> None:
    result = aggregate(
        SALES,
        group_by=["region"],
        metrics={"units": ["count", "sum", "mean", "min", "max", "std"], "price": ["max"]},
    )
    assert result == {
        "rows_in": 6,
        "rows_matched": 6,
        "groups": [
            {"region": "east", "units_count": 1, "units_sum": 4, "units_mean": 4.0,
             "units_min": 4, "units_max": 4, "units_std": 0.0, "price_max": 3.0},
            # north units 3, 1, 7: mean 11/3, population variance ((2/3)^2 + (8/3)^2 + (10/3)^2)/3
            {"region": "north", "units_count": 3, "units_sum": 11,
             "units_mean": pytest.approx(11 / 3), "units_min": 1, "units_max": 7,
             "units_std": pytest.approx(math.sqrt(168 / 27)), "price_max": 8.0},
            {"region": "south", "units_count": 2, "units_sum": 7, "units_mean": 3.5,
             "units_min": 2, "units_max": 5, "units_std": 1.5, "price_max": 9.5},
        ],
    }  # fmt: skip


def test_two_group_columns_sort_by_both_and_where_filters() -> None:
    result = aggregate(
        SALES,
        group_by=["product", "region"],
        metrics={"price": ["sum"]},
        where=[["units", ">=", 2], ["region", "!=", "east"]],
    )
    assert result["rows_matched"] == 4
    assert result["groups"] == [
        {"product": "ink", "region": "south", "price_sum": 9.5},
        {"product": "pen", "region": "north", "price_sum": 4.5},
        {"product": "pen", "region": "south", "price_sum": 1.0},
    ]


@pytest.mark.parametrize(
    ("clause", "matched_units"),
    [
        (["units", "==", 3], [3]),
        (["units", "!=", 3], [5, 1, 7, 2, 4]),
        (["units", "<", 3], [1, 2]),
        (["units", "<=", 3], [3, 1, 2]),
        (["units", ">", 4.5], [5, 7]),
        (["units", ">=", 5], [5, 7]),
        (["units", "in", [1, 7, 99]], [1, 7]),
        (["region", "in", ["east", "south"]], [5, 2, 4]),
        (["product", "==", "ink"], [1, 2]),
        (["product", "<", "jam"], [1, 2]),
        (["region", "in", []], []),
    ],
)
def test_each_where_op(clause: list[Any], matched_units: list[int]) -> None:
    result = aggregate(SALES, group_by=[], metrics={"units": ["sum"]}, where=[clause])
    assert result["rows_matched"] == len(matched_units)
    expected = [{"units_sum": sum(matched_units)}] if matched_units else []
    assert result["groups"] == expected


def test_columnar_input_gives_the_same_result_as_records() -> None:
    columnar = {name: [row[name] for row in SALES] for name in SALES[0]}
    query: dict[str, Any] = {"group_by": ["region"], "metrics": {"units": ["sum", "mean"]}}
    assert aggregate(columnar, **query) == aggregate(SALES, **query)
    as_arrays = {name: np.asarray(values) for name, values in columnar.items()}
    assert aggregate(as_arrays, **query) == aggregate(SALES, **query)


def test_output_is_plain_python_that_msgpack_encodes() -> None:
    flags = [{"on": True, "n": i, "x": i / 2} for i in range(4)]
    result = aggregate(
        [*SALES, {"region": "west", "product": "pen", "units": 0, "price": 0.0}],
        group_by=["region", "units"],
        metrics={"price": ["count", "sum", "mean", "min", "max", "std"]},
    )
    result_flags = aggregate(flags, group_by=["on"], metrics={"n": ["sum", "max"], "x": ["min"]})
    for output in (result, result_flags):
        for group in output["groups"]:
            assert all(type(value) in (int, float, str, bool) for value in group.values())
        assert msgpack.unpackb(msgpack.packb(output)) == output
    assert result_flags["groups"] == [{"on": True, "n_sum": 6, "n_max": 3, "x_min": 0.0}]


def test_to_columns_types_each_column() -> None:
    columns = to_columns(SALES)
    assert {name: column.dtype.kind for name, column in columns.items()} == {
        "region": "U",
        "product": "U",
        "units": "i",
        "price": "f",
    }
    assert to_columns([]) == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"a": 1, "b": 2}, {"a": 3}], "row 1 lacks key 'b'"),
        ([{"a": 1}, {"a": 3, "c": 4}], "row 1 has key 'c', which row 0 lacks"),
        ([{"a": 1}, 5], "row 1 is not a mapping"),
        ({"a": [1, 2], "b": [1]}, "columns differ in length"),
        ({"a": [1, "x"]}, "column 'a' mixes strings"),
        ({"a": [1, None]}, "column 'a' must hold only numbers or only strings"),
        ({"a": [[1, 2], [3, 4]]}, "column 'a' must be flat"),
        ({"a": [[1, 2], [3]]}, "column 'a' cannot be an array"),
        ({"a": 5}, "column 'a' must be a list"),
        ("a,b\n1,2", "list of records or a dict of columns"),
    ],
)
def test_bad_tables_are_refused_clearly(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_columns(data)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"group_by": ["colour"], "metrics": {}}, "unknown column 'colour' in group_by"),
        ({"group_by": "region", "metrics": {}}, "group_by must be a list"),
        ({"group_by": ["region", "region"], "metrics": {}}, "names a column twice"),
        ({"group_by": [], "metrics": {"weight": ["sum"]}}, "unknown column 'weight' in metrics"),
        ({"group_by": [], "metrics": {"units": ["median"]}}, "unknown metric op 'median'"),
        ({"group_by": [], "metrics": {"units": "sum"}}, "must be a list of ops"),
        ({"group_by": [], "metrics": {"region": ["sum"]}}, "sum needs a numeric column"),
        ({"group_by": [], "metrics": {"region": ["std"]}}, "std needs a numeric column"),
        (
            {"group_by": [], "metrics": {}, "where": [["units", "~", 1]]},
            "unknown where op '~'",
        ),
        (
            {"group_by": [], "metrics": {}, "where": [["size", "==", 1]]},
            "unknown column 'size' in where",
        ),
        ({"group_by": [], "metrics": {}, "where": [["units", "=="]]}, "must be \\[column, op"),
        (
            {"group_by": [], "metrics": {}, "where": [["units", "==", "3"]]},
            "holds numbers; cannot compare it with '3'",
        ),
        (
            {"group_by": [], "metrics": {}, "where": [["region", ">", 3]]},
            "holds strings; cannot compare it with 3",
        ),
        ({"group_by": [], "metrics": {}, "where": [["units", "in", 3]]}, "'in' needs a list"),
        (
            {"group_by": [], "metrics": {}, "where": [["units", "<", 2**70]]},
            "out of range for column 'units'",
        ),
    ],
)
def test_bad_queries_are_refused_clearly(query: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate(SALES, **query)


def test_count_works_on_string_columns_and_an_empty_match_gives_no_groups() -> None:
    counted = aggregate(SALES, group_by=["product"], metrics={"region": ["count"]})
    assert counted["groups"] == [
        {"product": "ink", "region_count": 2},
        {"product": "pen", "region_count": 4},
    ]
    none = aggregate(SALES, group_by=["region"], metrics={}, where=[["units", ">", 100]])
    assert none == {"rows_in": 6, "rows_matched": 0, "groups": []}


# ---- property: aggregate agrees with plain Python on random small tables ----------------------

tables = st.integers(min_value=0, max_value=25).flatmap(
    lambda rows: st.fixed_dictionaries(
        {
            "key": st.lists(st.sampled_from(["a", "b", "c", "dd"]), min_size=rows, max_size=rows),
            "n": st.lists(st.integers(-1000, 1000), min_size=rows, max_size=rows),
            "x": st.lists(
                st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                min_size=rows,
                max_size=rows,
            ),
        }
    )
)


def reference(table: dict[str, list[Any]], threshold: int) -> list[dict[str, Any]]:
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(table["key"]):
        if table["n"][row] >= threshold:
            groups.setdefault(key, []).append(row)
    out = []
    for key in sorted(groups):
        ns = [table["n"][row] for row in groups[key]]
        xs = [table["x"][row] for row in groups[key]]
        out.append(
            {
                "key": key,
                "n_count": len(ns),
                "n_sum": sum(ns),
                "n_min": min(ns),
                "n_max": max(ns),
                "n_mean": sum(ns) / len(ns),
                "x_sum": math.fsum(xs),
                "x_min": min(xs),
                "x_max": max(xs),
                "x_mean": math.fsum(xs) / len(xs),
                "x_std": statistics.pstdev(xs),
            }
        )
    return out


@settings(max_examples=150, deadline=None)
@given(table=tables, threshold=st.integers(-1100, 1100))
def test_aggregate_matches_plain_python(table: dict[str, list[Any]], threshold: int) -> None:
    result = aggregate(
        table,
        group_by=["key"],
        metrics={
            "n": ["count", "sum", "min", "max", "mean"],
            "x": ["sum", "min", "max", "mean", "std"],
        },
        where=[["n", ">=", threshold]],
    )
    expected = reference(table, threshold)
    assert result["rows_in"] == len(table["key"])
    assert result["rows_matched"] == sum(group["n_count"] for group in expected)
    assert len(result["groups"]) == len(expected)
    for got, want in zip(result["groups"], expected, strict=True):
        exact = ("key", "n_count", "n_sum", "n_min", "n_max", "x_min", "x_max")
        assert {name: got[name] for name in exact} == {name: want[name] for name in exact}
        for name in ("n_mean", "x_sum", "x_mean", "x_std"):
            assert math.isclose(got[name], want[name], rel_tol=1e-9, abs_tol=1e-6), name
