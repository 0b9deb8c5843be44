"""workers.workloads.mlp: the MLP classifier on numpy, and on PyTorch where it is importable."""

import sys
from typing import Any

import numpy as np
import pytest

from workers.workloads.mlp import (
    MAX_ELEMENTS,
    TrainResult,
    generate_dataset,
    predict,
    train,
)

SAMPLES, FEATURES, CLASSES = 240, 6, 3
TRAINING = {"hidden": 16, "epochs": 25, "seed": 3}


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return generate_dataset(SAMPLES, FEATURES, CLASSES, seed=7)


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def train_logged(x: np.ndarray, y: np.ndarray, **kwargs: Any) -> tuple[TrainResult, list[tuple]]:
    history: list[tuple[int, float, float]] = []
    result = train(x, y, on_epoch=lambda *epoch: history.append(epoch), **kwargs)
    return result, history


def assert_learned(result: TrainResult, history: list[tuple], epochs: int) -> None:
    assert result.accuracy >= 0.9
    assert [epoch for epoch, _, _ in history] == list(range(1, epochs + 1))
    first_loss, last_loss = history[0][1], history[-1][1]
    assert last_loss < first_loss
    assert (history[-1][1], history[-1][2]) == (result.loss, result.accuracy)
    assert result.epochs == epochs


def assert_weight_layout(weights: dict[str, np.ndarray], hidden: int) -> None:
    shapes = {key: value.shape for key, value in weights.items()}
    assert shapes == {
        "w1": (FEATURES, hidden),
        "b1": (hidden,),
        "w2": (hidden, CLASSES),
        "b2": (CLASSES,),
    }
    assert all(isinstance(value, np.ndarray) for value in weights.values())
    assert all(value.dtype == np.float32 for value in weights.values())


def test_generate_dataset_is_balanced_typed_and_seeded() -> None:
    x, y = generate_dataset(90, 4, 3, seed=1)
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((90, 4), np.float32, (90,), np.int64)
    assert np.bincount(y).tolist() == [30, 30, 30]
    again_x, again_y = generate_dataset(90, 4, 3, seed=1)
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    assert not np.array_equal(x, generate_dataset(90, 4, 3, seed=2)[0])


def test_numpy_training_learns_the_blobs(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    result, history = train_logged(x, y, backend="numpy", **TRAINING)
    assert_learned(result, history, TRAINING["epochs"])
    assert (result.backend, result.device) == ("numpy", "cpu")
    assert_weight_layout(result.weights, TRAINING["hidden"])


def test_full_batch_descent_also_learns(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    result, history = train_logged(
        x, y, backend="numpy", hidden=16, epochs=150, lr=0.5, batch_size=SAMPLES
    )
    assert_learned(result, history, 150)


def test_predict_agrees_with_the_training_accuracy(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    result = train(x, y, backend="numpy", **TRAINING)
    labels, probabilities = predict(result.weights, x, backend="numpy")
    assert labels.dtype == np.int64 and probabilities.dtype == np.float32
    assert np.mean(labels == y) == result.accuracy
    assert probabilities.shape == (SAMPLES, CLASSES)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(probabilities.argmax(axis=1), labels)


def test_training_is_deterministic_given_a_seed(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    first = train(x, y, backend="numpy", hidden=8, epochs=3, seed=5)
    second = train(x, y, backend="numpy", hidden=8, epochs=3, seed=5)
    other = train(x, y, backend="numpy", hidden=8, epochs=3, seed=6)
    for key in first.weights:
        assert np.array_equal(first.weights[key], second.weights[key])
    assert not np.array_equal(first.weights["w1"], other.weights["w1"])


def test_auto_falls_back_to_numpy_without_torch(
    blobs: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    x, y = blobs
    assert train(x, y, hidden=4, epochs=1).backend == "numpy"
    with pytest.raises(ValueError, match="backend='torch' needs PyTorch"):
        train(x, y, backend="torch", epochs=1)
    with pytest.raises(ValueError, match="backend='torch' needs PyTorch"):
        predict(train(x, y, hidden=4, epochs=1).weights, x, backend="torch")


GOOD_X = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]
GOOD_Y = [0, 1, 0]


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        ([[0.0, 1.0], [1.0]], [0, 1], {}, "rectangular"),
        (GOOD_X, [0, 1], {}, "3 rows but y has 2 labels"),
        (GOOD_X, [0, 1, 2], {"classes": 2}, r"labels must be in 0\.\.1"),
        (GOOD_X, [0, -1, 1], {}, r"labels must be in 0\.\.1"),
        (np.zeros((0, 2)), [], {}, "empty"),
        ([[0.0, np.nan], [1.0, 0.0], [2.0, 2.0]], GOOD_Y, {}, "NaN or infinite"),
        ([[0.0, np.inf], [1.0, 0.0], [2.0, 2.0]], GOOD_Y, {}, "NaN or infinite"),
        ([[0.0, 1e39], [1.0, 0.0], [2.0, 2.0]], GOOD_Y, {}, "too large for float32"),
        ([0.0, 1.0, 2.0], GOOD_Y, {}, "2-D"),
        ([["a", "b"], ["c", "d"], ["e", "f"]], GOOD_Y, {}, "must hold numbers"),
        (GOOD_X, [0.0, 1.0, 0.0], {}, "integer labels"),
        (GOOD_X, [0, 0, 0], {}, "single class"),
        (np.broadcast_to(np.float32(0), (MAX_ELEMENTS + 1, 1)), [0], {}, "limit 10000000"),
        (GOOD_X, GOOD_Y, {"hidden": 4097}, "hidden must be between 1 and 4096"),
        (GOOD_X, GOOD_Y, {"hidden": 0}, "hidden must be between"),
        (GOOD_X, GOOD_Y, {"epochs": 10_001}, "epochs must be between 1 and 10000"),
        (GOOD_X, GOOD_Y, {"epochs": 2.5}, "epochs must be an integer"),
        (GOOD_X, GOOD_Y, {"lr": 0}, "lr must be a finite number > 0"),
        (GOOD_X, GOOD_Y, {"lr": float("nan")}, "lr must be a finite number > 0"),
        (GOOD_X, GOOD_Y, {"backend": "jax"}, "backend must be one of"),
        (GOOD_X, GOOD_Y, {"classes": 1}, "classes must be between 2"),
    ],
)
def test_bad_training_inputs_are_refused_clearly(
    x: Any, y: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train(x, y, **{"backend": "numpy", **kwargs})


def test_bad_prediction_inputs_are_refused_clearly(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    weights = train(x, y, backend="numpy", hidden=4, epochs=1).weights
    with pytest.raises(ValueError, match="lack"):
        predict({key: weights[key] for key in ("w1", "b1", "w2")}, x, backend="numpy")
    with pytest.raises(ValueError, match=f"x has 2 features but the model expects {FEATURES}"):
        predict(weights, x[:, :2], backend="numpy")
    with pytest.raises(ValueError, match="disagree on the hidden size"):
        predict({**weights, "w2": weights["w2"][:2], "b1": weights["b1"]}, x, backend="numpy")


def test_generate_dataset_refuses_absurd_sizes() -> None:
    with pytest.raises(ValueError, match="limit 10000000"):
        generate_dataset(100_000, 101, 3, seed=0)
    with pytest.raises(ValueError, match="classes must be between 2"):
        generate_dataset(10, 2, 1, seed=0)


# ---- PyTorch: skipped where it is not installed -----------------------------------------------


def test_torch_training_learns_the_blobs(torch: Any, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = blobs
    result, history = train_logged(x, y, backend="torch", use_gpu=False, **TRAINING)
    assert_learned(result, history, TRAINING["epochs"])
    assert (result.backend, result.device) == ("torch", "cpu")
    assert_weight_layout(result.weights, TRAINING["hidden"])


def test_torch_weights_predicted_by_numpy_give_the_same_labels(
    torch: Any, blobs: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = blobs
    result = train(x, y, backend="torch", **TRAINING)
    torch_labels, torch_probabilities = predict(result.weights, x, backend="torch")
    numpy_labels, numpy_probabilities = predict(result.weights, x, backend="numpy")
    assert np.array_equal(torch_labels, numpy_labels)
    assert np.allclose(torch_probabilities, numpy_probabilities, atol=1e-5)
    assert np.mean(numpy_labels == y) == result.accuracy


def test_numpy_weights_predicted_by_torch_give_the_same_labels(
    torch: Any, blobs: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = blobs
    result = train(x, y, backend="numpy", **TRAINING)
    assert np.array_equal(
        predict(result.weights, x, backend="torch")[0],
        predict(result.weights, x, backend="numpy")[0],
    )


def test_both_backends_follow_the_same_path_from_a_seed(
    torch: Any, blobs: tuple[np.ndarray, np.ndarray]
) -> None:
    # Same initial weights and batch order: only float rounding separates them.
    x, y = blobs
    on_numpy = train(x, y, backend="numpy", hidden=8, epochs=3, seed=2)
    on_torch = train(x, y, backend="torch", use_gpu=False, hidden=8, epochs=3, seed=2)
    for key in on_numpy.weights:
        assert np.allclose(on_numpy.weights[key], on_torch.weights[key], atol=1e-4)
    assert on_numpy.loss == pytest.approx(on_torch.loss, rel=1e-4)


def test_torch_trains_on_the_gpu_when_there_is_one(
    torch: Any, blobs: tuple[np.ndarray, np.ndarray]
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, y = blobs
    result = train(x, y, backend="torch", use_gpu=True, **TRAINING)
    assert result.device.startswith("cuda:")
    assert result.accuracy >= 0.9
