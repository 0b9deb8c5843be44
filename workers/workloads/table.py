"""Columnar data processing on numpy: rows or columns in, filtered grouped aggregates out.

The work is vectorised: rows are grouped with `np.unique(..., return_inverse=True)`, sorted by
group once, and every metric is one `ufunc.reduceat` over the sorted values. Python loops run
over columns, clauses and groups, never over rows (except to turn records into columns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Column = npt.NDArray[Any]
Columns = dict[str, Column]
Records = Sequence[Mapping[str, Any]]
ColumnarInput = Mapping[str, Sequence[Any] | npt.NDArray[Any]]

OPS = ("count", "sum", "mean", "min", "max", "std")
COMPARISONS: dict[str, Callable[[Column, Any], npt.NDArray[np.bool_]]] = {
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}
WHERE_OPS = (*COMPARISONS, "in")
NUMERIC_KINDS = "biuf"


def to_columns(data: Records | ColumnarInput) -> Columns:
    """Columns as 1-D numpy arrays, all the same length, from a list of records (dicts with
    the same keys) or from a dict of columns. Each column holds numbers (bool, int, float)
    or strings, not a mix."""
    if isinstance(data, Mapping):
        raw: Mapping[str, Any] = data
    elif isinstance(data, list | tuple):
        raw = _records_to_lists(data)
    else:
        raise ValueError(f"data must be a list of records or a dict of columns, not {type(data)}")
    columns = {_check_column_name(name): _as_column(name, values) for name, values in raw.items()}
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns differ in length: {lengths}")
    return columns


def aggregate(
    data: Records | ColumnarInput,
    *,
    group_by: Sequence[str],
    metrics: Mapping[str, Sequence[str]],
    where: Sequence[Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Filter rows by `where` (all clauses must hold), group them by the `group_by` columns
    and compute `metrics` ({column: [op, ...]}, ops from `OPS`) for each group.

    Returns {"rows_in", "rows_matched", "groups"}: one dict per group, in ascending key order,
    holding the group columns' values and "<column>_<op>" for each metric, as plain Python
    values. "std" is the population standard deviation (ddof=0, as numpy's). With no group
    columns, all matched rows form one group; no matched rows give no groups.
    """
    columns = to_columns(data)
    rows_in = len(next(iter(columns.values()))) if columns else 0
    keys = _check_group_by(columns, group_by)
    plan = _check_metrics(columns, metrics, keys)
    mask = _where_mask(columns, where, rows_in)
    rows_matched = int(mask.sum())
    result: dict[str, Any] = {"rows_in": rows_in, "rows_matched": rows_matched, "groups": []}
    if rows_matched == 0:
        return result

    key_values, group_ids = _group(columns, keys, mask)
    # Sort rows by group once; each group is then a contiguous run starting at `starts`.
    order = np.argsort(group_ids, kind="stable")
    sorted_ids = group_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    counts = np.diff(np.r_[starts, rows_matched])
    outputs = {
        f"{name}_{op}": _metric(op, columns[name][mask][order], sorted_ids, starts, counts)
        for name, op in plan
    }
    output_lists = {key: values.tolist() for key, values in {**key_values, **outputs}.items()}
    result["groups"] = [
        {key: values[group] for key, values in output_lists.items()} for group in range(len(starts))
    ]
    return result


# ---- columns --------------------------------------------------------------------------------


def _records_to_lists(records: Records) -> dict[str, list[Any]]:
    if not records:
        return {}
    names = _check_record(records[0], 0)
    for index, record in enumerate(records):
        keys = _check_record(record, index)
        missing = [name for name in names if name not in record]
        if missing:
            raise ValueError(f"row {index} lacks key {missing[0]!r}, which row 0 has")
        extra = [key for key in keys if key not in records[0]]
        if extra:
            raise ValueError(f"row {index} has key {extra[0]!r}, which row 0 lacks")
    return {name: [record[name] for record in records] for name in names}


def _check_record(record: object, index: int) -> list[str]:
    if not isinstance(record, Mapping):
        raise ValueError(f"row {index} is not a mapping of column names to values: {record!r}")
    return list(record)


def _check_column_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"column names must be non-empty strings, got {name!r}")
    return name


def _as_column(name: str, values: object) -> Column:
    if isinstance(values, np.ndarray) and values.dtype.kind in NUMERIC_KINDS + "U":
        array = values
    elif isinstance(values, np.ndarray | list | tuple):
        try:
            array = np.asarray(values)
        except (ValueError, OverflowError, TypeError) as error:
            raise ValueError(f"column {name!r} cannot be an array: {error}") from error
        if array.dtype.kind == "U" and not all(isinstance(value, str) for value in values):
            # np.asarray turns [1, "a"] into strings without a word.
            raise ValueError(f"column {name!r} mixes strings with other values")
        if len(values) == 0:
            array = np.zeros(0, dtype=np.float64)
    else:
        raise ValueError(f"column {name!r} must be a list of values, got {type(values)}")
    if array.ndim != 1:
        raise ValueError(f"column {name!r} must be flat, got shape {array.shape}")
    if array.dtype.kind not in NUMERIC_KINDS + "U":
        raise ValueError(
            f"column {name!r} must hold only numbers or only strings (no None, no nesting); "
            f"got values numpy can only hold as {array.dtype}"
        )
    return array


def _column(columns: Columns, name: object, where: str) -> Column:
    if not isinstance(name, str) or name not in columns:
        raise ValueError(f"unknown column {name!r} in {where}; columns are {sorted(columns)}")
    return columns[name]


# ---- the query ------------------------------------------------------------------------------


def _check_group_by(columns: Columns, group_by: Sequence[str]) -> list[str]:
    if isinstance(group_by, str) or not isinstance(group_by, list | tuple):
        raise ValueError(f"group_by must be a list of column names, got {group_by!r}")
    for name in group_by:
        _column(columns, name, "group_by")
    if len(set(group_by)) != len(group_by):
        raise ValueError(f"group_by names a column twice: {list(group_by)}")
    return list(group_by)


def _check_metrics(
    columns: Columns, metrics: Mapping[str, Sequence[str]], keys: list[str]
) -> list[tuple[str, str]]:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of column -> list of ops, got {metrics!r}")
    plan: list[tuple[str, str]] = []
    for name, ops in metrics.items():
        column = _column(columns, name, "metrics")
        if isinstance(ops, str) or not isinstance(ops, list | tuple):
            raise ValueError(f"metrics[{name!r}] must be a list of ops from {list(OPS)}")
        for op in ops:
            if op not in OPS:
                raise ValueError(f"unknown metric op {op!r} for {name!r}; ops are {list(OPS)}")
            if op != "count" and column.dtype.kind not in NUMERIC_KINDS:
                raise ValueError(f"{op} needs a numeric column, but {name!r} holds strings")
            if f"{name}_{op}" in keys:
                raise ValueError(f"metric {name}_{op} has the name of a group_by column")
            if (name, op) not in plan:
                plan.append((name, op))
    return plan


def _where_mask(
    columns: Columns, where: Sequence[Sequence[Any]] | None, rows: int
) -> npt.NDArray[np.bool_]:
    mask = np.ones(rows, dtype=np.bool_)
    if where is None:
        return mask
    if not isinstance(where, list | tuple):
        raise ValueError(f"where must be a list of [column, op, value] clauses, got {where!r}")
    for clause in where:
        if not isinstance(clause, list | tuple) or len(clause) != 3:
            raise ValueError(f"where clause {clause!r} must be [column, op, value]")
        name, op, value = clause
        column = _column(columns, name, "where")
        if op == "in":
            if not isinstance(value, list | tuple):
                raise ValueError(f"'in' needs a list of values, got {value!r} for {name!r}")
            for item in value:
                _check_comparable(name, column, item)
            mask &= np.isin(column, np.asarray(value))
        elif op in COMPARISONS:
            _check_comparable(name, column, value)
            mask &= COMPARISONS[op](column, value)
        else:
            raise ValueError(f"unknown where op {op!r}; ops are {list(WHERE_OPS)}")
    return mask


def _check_comparable(name: str, column: Column, value: object) -> None:
    if column.dtype.kind == "U":
        if not isinstance(value, str):
            raise ValueError(f"column {name!r} holds strings; cannot compare it with {value!r}")
    elif isinstance(value, str) or not isinstance(value, int | float | np.number | np.bool_):
        raise ValueError(f"column {name!r} holds numbers; cannot compare it with {value!r}")
    elif column.dtype.kind in "iu" and isinstance(value, int) and value not in _int_range(column):
        raise ValueError(f"{value} is out of range for column {name!r} ({column.dtype})")


def _int_range(column: Column) -> range:
    info = np.iinfo(column.dtype)
    return range(int(info.min), int(info.max) + 1)


def _group(
    columns: Columns, keys: list[str], mask: npt.NDArray[np.bool_]
) -> tuple[dict[str, Column], npt.NDArray[np.intp]]:
    """Each group's key values, in key order, and each matched row's group id."""
    rows = int(mask.sum())
    if not keys:
        return {}, np.zeros(rows, dtype=np.intp)
    uniques, codes = [], []
    for name in keys:
        unique, inverse = np.unique(columns[name][mask], return_inverse=True)
        uniques.append(unique)
        codes.append(inverse.reshape(-1))
    # Codes follow each column's sorted order, so sorting code tuples sorts by the key values.
    combinations, group_ids = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    key_values = {name: uniques[i][combinations[:, i]] for i, name in enumerate(keys)}
    return key_values, group_ids.reshape(-1).astype(np.intp)


def _metric(
    op: str,
    values: Column,
    group_ids: npt.NDArray[np.intp],
    starts: npt.NDArray[np.intp],
    counts: npt.NDArray[np.intp],
) -> Column:
    """One metric per group over `values`, sorted by group, groups starting at `starts`."""
    if op == "count":
        return counts
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    elif values.dtype.kind == "f":
        values = values.astype(np.float64)
    if op == "sum":
        return np.add.reduceat(values, starts)
    if op == "min":
        return np.minimum.reduceat(values, starts)
    if op == "max":
        return np.maximum.reduceat(values, starts)
    mean = np.add.reduceat(values.astype(np.float64), starts) / counts
    if op == "mean":
        return mean
    deviations = values - mean[group_ids]
    std: Column = np.sqrt(np.add.reduceat(deviations * deviations, starts) / counts)
    return std
