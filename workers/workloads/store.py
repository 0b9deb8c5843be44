"""A directory of named models: weights in `.npz` (never pickle), metadata in `<name>.json`.

Layout under the root, for a model `name` at version `v`:

    name.json        {"name", "version", "meta"}: the commit point, replaced atomically
    name.v<v>.npz    the weights of version v
    .name.lock       taken by `save`, so concurrent saves number their versions one by one

A save writes the new `.npz` first and the `.json` that names it second, each through a temp
file and `os.replace`, so a reader sees either the old model or the new one, never half of one
and never new metadata with old weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from workers.errors import WorkerError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Array keys become member names inside the zip file: keep them plain. np.savez takes them as
# keyword arguments, so its own parameter names cannot be array names.
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED_KEYS = frozenset({"file", "args", "allow_pickle"})
# A load that lost the race with a save (its .npz was just removed) re-reads the metadata.
LOAD_ATTEMPTS = 5

Arrays = dict[str, npt.NDArray[Any]]


class ModelNotFound(WorkerError, KeyError):
    """No model of that name in the store."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(f"no model named {name!r} in the model store at {root}")
        self.name = name
        self.root = root

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of the message, quotes and all.
        return str(self.args[0])


@dataclass(frozen=True)
class StoredModel:
    """Where `save` put a model: its name, its new version and the weights file."""

    name: str
    version: int
    path: Path


class ModelStore:
    """Models saved and loaded by name under `root` (created on the first save)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(
        self, name: str, weights: Mapping[str, npt.ArrayLike], meta: Mapping[str, Any]
    ) -> StoredModel:
        """Store `weights` (numeric arrays) and `meta` (JSON-serialisable) as the next version
        of `name`; the version goes up by one on every save, starting at 1."""
        _check_name(name)
        arrays = _check_arrays(weights)
        _encode_record(name, 0, meta)  # fail on bad meta before touching the store
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked(name):
            previous = self.version(name)
            version = (previous or 0) + 1
            path = self._weights_path(name, version)
            record = _encode_record(name, version, meta)
            self._write_atomically(path, lambda file: np.savez(file, **_as_kwargs(arrays)))
            self._write_atomically(self._meta_path(name), lambda file: file.write(record))
            if previous is not None:
                # A reader that read the old metadata and opens this file next finds it gone
                # and retries with the new metadata (see `load`).
                self._weights_path(name, previous).unlink(missing_ok=True)
        return StoredModel(name=name, version=version, path=path)

    def load(self, name: str) -> tuple[Arrays, dict[str, Any]]:
        """The weights and metadata of the latest version of `name`.

        A cache should read `version(name)` before `load(name)`: a save in between then makes
        it reload once more, rather than keep newer weights under an older version.
        """
        _check_name(name)
        for _ in range(LOAD_ATTEMPTS):
            record = self._read_record(name)
            try:
                with np.load(
                    self._weights_path(name, record["version"]), allow_pickle=False
                ) as archive:
                    weights = {key: archive[key] for key in archive.files}
            except FileNotFoundError:
                continue
            return weights, dict(record["meta"])
        raise WorkerError(f"model {name!r} kept changing while being loaded; try again")

    def version(self, name: str) -> int | None:
        """The latest version of `name`, or None when there is none; every save changes it."""
        _check_name(name)
        try:
            return int(self._read_record(name)["version"])
        except ModelNotFound:
            return None

    def _read_record(self, name: str) -> dict[str, Any]:
        try:
            text = self._meta_path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelNotFound(name, self.root) from None
        record: dict[str, Any] = json.loads(text)
        return record

    def _meta_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def _weights_path(self, name: str, version: int) -> Path:
        return self.root / f"{name}.v{int(version)}.npz"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with (self.root / f".{name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _write_atomically(self, path: Path, write: Callable[[IO[bytes]], object]) -> None:
        # The temp file sits in the same directory, so os.replace is a rename on one
        # filesystem: atomic, readers see the old file or the new one.
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"model name {name!r} is not allowed: 1-64 characters of letters, digits, '_', "
            "'.' and '-', starting with a letter or digit, with no '..'"
        )


def _encode_record(name: str, version: int, meta: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps({"name": name, "version": version, "meta": dict(meta)}, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"meta must be JSON-serialisable: {error}") from error
    return text.encode("utf-8")


def _check_arrays(weights: Mapping[str, npt.ArrayLike]) -> Arrays:
    if not weights:
        raise ValueError("weights are empty: nothing to store")
    arrays: Arrays = {}
    for key, value in weights.items():
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or key in RESERVED_KEYS:
            raise ValueError(
                f"weight name {key!r} is not allowed: use a plain identifier, "
                f"not one of {sorted(RESERVED_KEYS)}"
            )
        array = np.asarray(value)
        # np.savez would pickle object arrays, and loading those needs allow_pickle.
        if array.dtype.kind not in "biufc":
            raise ValueError(f"weight {key!r} must be numeric, got dtype {array.dtype}")
        arrays[key] = array
    return arrays


def _as_kwargs(arrays: Arrays) -> dict[str, Any]:
    # np.savez's stubs type **kwds against its own keyword parameters; the names are checked.
    return dict(arrays)
