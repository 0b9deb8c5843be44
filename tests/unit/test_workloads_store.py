"""workers.workloads.store: models on disk as .npz + .json, atomic, never pickled."""

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.errors import WorkerError
from workers.workloads.mlp import generate_dataset, predict, train
from workers.workloads.store import ModelNotFound, ModelStore, StoredModel


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def awkward_arrays() -> dict[str, np.ndarray]:
    """Values a lossy format would get wrong: signed zero, NaN payloads, extremes, 0-d, empty."""
    rng = np.random.default_rng(0)
    return {
        "w1": rng.normal(size=(5, 3)).astype(np.float32),
        "special": np.array([-0.0, np.nan, np.inf, -np.inf, np.finfo(np.float64).tiny]),
        "big_ints": np.array([np.iinfo(np.int64).min, -1, np.iinfo(np.int64).max]),
        "fortran": np.asfortranarray(rng.normal(size=(3, 4))),
        "scalar": np.array(7, dtype=np.int16),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "flags": np.array([True, False]),
    }


def test_weights_round_trip_bit_exactly(store: ModelStore) -> None:
    weights = awkward_arrays()
    store.save("awkward", weights, {"note": "x"})
    loaded, meta = store.load("awkward")
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        assert loaded[key].dtype == value.dtype
        assert loaded[key].shape == value.shape
        assert loaded[key].tobytes(order="A") == value.tobytes(order="A")
    assert meta == {"note": "x"}


def test_a_trained_model_predicts_identically_after_save_and_load(store: ModelStore) -> None:
    x, y = generate_dataset(120, 5, 3, seed=4)
    result = train(x, y, backend="numpy", hidden=8, epochs=5)
    meta = {"accuracy": result.accuracy, "classes": 3, "features": ["a", "b"]}
    store.save("blobs", result.weights, meta)
    weights, loaded_meta = store.load("blobs")
    before_labels, before_probabilities = predict(result.weights, x, backend="numpy")
    after_labels, after_probabilities = predict(weights, x, backend="numpy")
    assert np.array_equal(before_labels, after_labels)
    assert np.array_equal(before_probabilities, after_probabilities)
    assert loaded_meta == meta


def test_every_save_is_a_new_version_and_replaces_the_old_files(store: ModelStore) -> None:
    assert store.version("m") is None
    first = store.save("m", {"w": np.zeros(2)}, {})
    assert first == StoredModel(name="m", version=1, path=store.root / "m.v1.npz")
    second = store.save("m", {"w": np.ones(2)}, {"step": 2})
    assert (second.version, store.version("m")) == (2, 2)
    assert np.array_equal(store.load("m")[0]["w"], np.ones(2))
    visible = sorted(path.name for path in store.root.iterdir() if not path.name.startswith("."))
    assert visible == ["m.json", "m.v2.npz"]
    assert not list(store.root.glob("*.tmp"))


def test_an_unknown_model_is_a_key_error_naming_the_store(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound) as caught:
        store.load("missing")
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, WorkerError)
    assert str(caught.value) == f"no model named 'missing' in the model store at {store.root}"
    assert store.version("missing") is None


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../escape", "a/b", "/abs", "a..b", ".hidden", "-dash", "a b", "a\n", "x" * 65],
)
def test_names_that_could_escape_the_root_are_refused(store: ModelStore, name: str) -> None:
    for call in (
        lambda: store.save(name, {"w": np.zeros(1)}, {}),
        lambda: store.load(name),
        lambda: store.version(name),
    ):
        with pytest.raises(ValueError, match="is not allowed"):
            call()
    assert not store.root.exists()


def test_longest_allowed_name_works(store: ModelStore) -> None:
    name = "A" + "b_.-9" * 12 + "zzz"
    assert len(name) == 64
    store.save(name, {"w": np.zeros(1)}, {})
    assert store.version(name) == 1


@pytest.mark.parametrize(
    ("weights", "meta", "message"),
    [
        ({"w": np.array([{"x": 1}], dtype=object)}, {}, "must be numeric"),
        ({"w": ["a", "b"]}, {}, "must be numeric"),
        ({"a/b": np.zeros(1)}, {}, "not allowed"),
        ({"file": np.zeros(1)}, {}, "not allowed"),
        ({}, {}, "empty"),
        ({"w": np.zeros(1)}, {"when": object()}, "JSON-serialisable"),
        ({"w": np.zeros(1)}, {"loss": float("nan")}, "JSON-serialisable"),
    ],
)
def test_bad_models_are_refused_before_anything_is_written(
    store: ModelStore, weights: dict[str, Any], meta: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.save("m", weights, meta)
    assert store.version("m") is None


def test_load_never_unpickles(store: ModelStore) -> None:
    store.save("m", {"w": np.zeros(1)}, {})
    # Someone with write access swaps in an archive holding a pickled object.
    np.savez(store.root / "m.v1.npz", w=np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        store.load("m")


def test_a_concurrent_reader_always_sees_a_whole_model(store: ModelStore) -> None:
    # Each version's weights are filled with its step and its meta names the step, so a
    # reader that mixed two versions (or read half a file) would see a mismatch.
    store.save("live", {"w": np.zeros(4096)}, {"step": 0})
    done = threading.Event()
    seen: list[int] = []
    failures: list[str] = []

    def read() -> None:
        while not done.is_set():
            try:
                weights, meta = store.load("live")
            except Exception as error:  # an exception in a thread would not fail the test
                failures.append(repr(error))
                return
            if not np.all(weights["w"] == meta["step"]):
                failures.append(f"meta step {meta['step']} with weights {weights['w'][:3]}")
            seen.append(meta["step"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for step in range(1, 40):
            store.save("live", {"w": np.full(4096, step, dtype=np.float64)}, {"step": step})
    finally:
        done.set()
        reader.join()
    assert not failures
    assert len(seen) > 1


def test_concurrent_saves_each_get_their_own_version(store: ModelStore) -> None:
    def save_many() -> None:
        for _ in range(10):
            store.save("shared", {"w": np.zeros(8)}, {})

    writers = [threading.Thread(target=save_many) for _ in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert store.version("shared") == 30
    assert json.loads((store.root / "shared.json").read_text())["version"] == 30
    assert [path.name for path in store.root.glob("shared.v*.npz")] == ["shared.v30.npz"]
