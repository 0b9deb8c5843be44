"""A small MLP classifier: one tanh hidden layer, softmax cross-entropy, mini-batch gradient
descent. Runs on PyTorch when it is importable (the GPU when there is one), numpy otherwise;
both backends share the weight layout, so either one's weights load in the other."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
Weights = dict[str, Floats]
EpochCallback = Callable[[int, float, float], None]

BACKENDS = ("auto", "numpy", "torch")
# w1 (features, hidden), b1 (hidden,), w2 (hidden, classes), b2 (classes,).
WEIGHT_KEYS = ("w1", "b1", "w2", "b2")

# Hard limits, so a task's arguments cannot ask a worker for unbounded memory or time.
MAX_ELEMENTS = 10_000_000  # samples * features
MAX_HIDDEN = 4096
MAX_EPOCHS = 10_000
MAX_CLASSES = 10_000
MAX_PARAMETERS = 50_000_000
MAX_BATCH_SIZE = 65_536
# Rows are evaluated in chunks whose widest intermediate holds at most this many floats.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TrainResult:
    """A trained model: numpy float32 weights (keys `WEIGHT_KEYS`) and its final training-set
    loss and accuracy, with the backend and device that trained it."""

    weights: Weights
    loss: float
    accuracy: float
    epochs: int
    backend: str
    device: str


def generate_dataset(samples: int, features: int, classes: int, seed: int) -> tuple[Floats, Labels]:
    """Gaussian blobs, one per class, overlapping a little: float32 x (samples, features) and
    int64 labels 0..classes-1 in balanced numbers, shuffled. The same seed gives the same data."""
    samples = _check_int("samples", samples, 1, MAX_ELEMENTS)
    features = _check_int("features", features, 1, MAX_ELEMENTS)
    classes = _check_int("classes", classes, 2, MAX_CLASSES)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    _check_elements(samples, features)
    rng = np.random.default_rng(seed)
    # Centres spread 3 noise widths per axis: mostly separable, not trivially so in 2-D.
    centres = rng.normal(0.0, 3.0, size=(classes, features))
    y = rng.permutation(np.arange(samples) % classes).astype(np.int64)
    x = centres[y] + rng.normal(0.0, 1.0, size=(samples, features))
    return x.astype(np.float32), y


def train(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    classes: int | None = None,
    hidden: int = 32,
    epochs: int = 50,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    backend: str = "auto",
    use_gpu: bool = True,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train on (x, y) and return the weights with the final loss and accuracy over all of x.

    `classes` defaults to max(y) + 1. Each epoch visits the rows in a seeded random order in
    batches of `batch_size` (a size >= samples is full-batch descent). `backend` is "auto"
    (torch when importable), "numpy" or "torch"; torch trains on CUDA when `use_gpu` and a GPU
    is visible. `on_epoch(epoch, loss, accuracy)` runs after every epoch, numbered from 1;
    an exception it raises stops training and propagates.
    """
    torch = _load_backend(backend)
    hidden = _check_int("hidden", hidden, 1, MAX_HIDDEN)
    epochs = _check_int("epochs", epochs, 1, MAX_EPOCHS)
    batch_size = _check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    features = _as_features(x)
    labels = _as_labels(y, len(features))
    classes = _resolve_classes(classes, labels)
    samples, width = features.shape
    if width * hidden + hidden * classes > MAX_PARAMETERS:
        raise ValueError(
            f"the model would have {width * hidden + hidden * classes} parameters "
            f"(limit {MAX_PARAMETERS}); lower hidden or the number of features"
        )
    batch_size = min(batch_size, samples)
    if batch_size * max(hidden, classes) > CHUNK_ELEMENTS:
        raise ValueError(f"batch_size {batch_size} is too large for hidden={hidden}; lower it")

    rng = np.random.default_rng(seed)
    initial = _initial_weights(width, hidden, classes, rng)
    net: _Net = (
        _NumpyNet(initial, features, labels)
        if torch is None
        else mlp_torch().TorchNet(
            torch, mlp_torch().device(torch, use_gpu), initial, features, labels
        )
    )
    loss = accuracy = math.nan
    for epoch in range(1, epochs + 1):
        net.run_epoch(rng.permutation(samples), batch_size, float(lr))
        loss, accuracy = net.evaluate()
        if not math.isfinite(loss):
            raise ValueError(f"training diverged at epoch {epoch} (loss {loss}); lower lr")
        if on_epoch is not None:
            on_epoch(epoch, loss, accuracy)
    return TrainResult(
        weights=net.weights(),
        loss=loss,
        accuracy=accuracy,
        epochs=epochs,
        backend="numpy" if torch is None else "torch",
        device=net.device,
    )


def predict(
    weights: Mapping[str, npt.ArrayLike],
    x: npt.ArrayLike,
    *,
    backend: str = "auto",
    use_gpu: bool = True,
) -> tuple[Labels, Floats]:
    """Labels (int64) and class probabilities (float32, rows sum to 1) for each row of x."""
    torch = _load_backend(backend)
    checked = _check_weights(weights)
    features = _as_features(x)
    if features.shape[1] != checked["w1"].shape[0]:
        raise ValueError(
            f"x has {features.shape[1]} features but the model expects {checked['w1'].shape[0]}"
        )
    if torch is not None:
        torch_backend = mlp_torch()
        on_device = torch_backend.device(torch, use_gpu)
        predicted: tuple[Labels, Floats] = torch_backend.predict(
            torch, on_device, checked, features
        )
        return predicted
    labels = np.empty(len(features), dtype=np.int64)
    probabilities = np.empty((len(features), checked["w2"].shape[1]), dtype=np.float32)
    for rows in row_chunks(len(features), widest(checked)):
        logits = _logits(checked, features[rows])
        labels[rows] = logits.argmax(axis=1)
        probabilities[rows] = np.exp(_log_softmax(logits))
    return labels, probabilities


# ---- input checks ---------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _check_elements(samples: int, features: int) -> None:
    if samples * features > MAX_ELEMENTS:
        raise ValueError(
            f"{samples} samples x {features} features is {samples * features} values "
            f"(limit {MAX_ELEMENTS})"
        )


def _as_features(x: npt.ArrayLike) -> Floats:
    try:
        array = np.asarray(x)
    except ValueError as error:  # numpy refuses ragged nested lists
        raise ValueError(f"x must be a rectangular 2-D array of numbers: {error}") from error
    if array.ndim != 2:
        raise ValueError(f"x must be 2-D (samples, features), got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"x must hold numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"x is empty (shape {array.shape})")
    _check_elements(*array.shape)
    with np.errstate(over="ignore"):  # values past float32's range become inf, refused below
        features = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(features).all():
        raise ValueError("x holds NaN or infinite values (or values too large for float32)")
    return features


def _as_labels(y: npt.ArrayLike, samples: int) -> Labels:
    try:
        array = np.asarray(y)
    except ValueError as error:
        raise ValueError(f"y must be a flat list of integer labels: {error}") from error
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"y must be 1-D integer labels, got shape {array.shape} {array.dtype}")
    if len(array) != samples:
        raise ValueError(f"x has {samples} rows but y has {len(array)} labels")
    if array.dtype.kind == "u" and array.size and array.max() > MAX_CLASSES:
        raise ValueError(f"label {array.max()} is above the limit of {MAX_CLASSES} classes")
    return array.astype(np.int64)


def _resolve_classes(classes: int | None, labels: Labels) -> int:
    low, high = int(labels.min()), int(labels.max())
    if classes is None:
        if high < 1:
            raise ValueError("y shows a single class; pass classes= (at least 2)")
        classes = high + 1
    classes = _check_int("classes", classes, 2, MAX_CLASSES)
    if low < 0 or high >= classes:
        raise ValueError(f"labels must be in 0..{classes - 1}, got values in {low}..{high}")
    return classes


def _check_weights(weights: Mapping[str, npt.ArrayLike]) -> Weights:
    missing = [key for key in WEIGHT_KEYS if key not in weights]
    if missing:
        raise ValueError(f"weights lack {missing}; an MLP needs {list(WEIGHT_KEYS)}")
    checked = {key: np.asarray(weights[key], dtype=np.float32) for key in WEIGHT_KEYS}
    w1, b1, w2, b2 = (checked[key] for key in WEIGHT_KEYS)
    if w1.ndim != 2 or w2.ndim != 2 or b1.shape != w1.shape[1:] or b2.shape != w2.shape[1:]:
        raise ValueError(
            "weights have inconsistent shapes: "
            + ", ".join(f"{key} {checked[key].shape}" for key in WEIGHT_KEYS)
        )
    if w2.shape[0] != w1.shape[1]:
        raise ValueError(f"w1 {w1.shape} and w2 {w2.shape} disagree on the hidden size")
    if not all(np.isfinite(value).all() for value in checked.values()):
        raise ValueError("weights hold NaN or infinite values")
    return checked


# ---- the computation ------------------------------------------------------------------------


def _initial_weights(features: int, hidden: int, classes: int, rng: np.random.Generator) -> Weights:
    # Glorot-uniform, drawn from numpy for both backends: the same seed starts both from the
    # same point, so their results differ only by floating-point rounding.
    def glorot(fan_in: int, fan_out: int) -> Floats:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)

    return {
        "w1": glorot(features, hidden),
        "b1": np.zeros(hidden, dtype=np.float32),
        "w2": glorot(hidden, classes),
        "b2": np.zeros(classes, dtype=np.float32),
    }


def widest(weights: Weights) -> int:
    features, hidden = weights["w1"].shape
    return max(int(features), int(hidden), int(weights["w2"].shape[1]))


def row_chunks(samples: int, width: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // width)
    for start in range(0, samples, step):
        yield slice(start, start + step)


def _logits(weights: Weights, x: Floats) -> Floats:
    hidden = np.tanh(x @ weights["w1"] + weights["b1"])
    logits: Floats = hidden @ weights["w2"] + weights["b2"]
    return logits


def _log_softmax(logits: Floats) -> Floats:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities: Floats = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return log_probabilities


class _Net(Protocol):
    """One backend's training state: the loop in `train` drives it epoch by epoch."""

    device: str

    def run_epoch(self, order: npt.NDArray[np.int64], batch_size: int, lr: float) -> None: ...

    def evaluate(self) -> tuple[float, float]: ...

    def weights(self) -> Weights: ...


class _NumpyNet:
    device = "cpu"

    def __init__(self, weights: Weights, x: Floats, y: Labels) -> None:
        self._w = {key: value.copy() for key, value in weights.items()}
        self._x, self._y = x, y

    def run_epoch(self, order: npt.NDArray[np.int64], batch_size: int, lr: float) -> None:
        w1, b1, w2, b2 = (self._w[key] for key in WEIGHT_KEYS)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            xb, yb = self._x[rows], self._y[rows]
            hidden = np.tanh(xb @ w1 + b1)
            # d(mean cross-entropy)/d(logits) = (softmax - one_hot) / batch
            grad = np.exp(_log_softmax(hidden @ w2 + b2))
            grad[np.arange(len(rows)), yb] -= 1.0
            grad /= np.float32(len(rows))
            grad_hidden = (grad @ w2.T) * (1.0 - hidden * hidden)
            w2 -= lr * (hidden.T @ grad)
            b2 -= lr * grad.sum(axis=0)
            w1 -= lr * (xb.T @ grad_hidden)
            b1 -= lr * grad_hidden.sum(axis=0)

    def evaluate(self) -> tuple[float, float]:
        total_loss, correct = 0.0, 0
        for rows in row_chunks(len(self._x), widest(self._w)):
            logits, y = _logits(self._w, self._x[rows]), self._y[rows]
            total_loss -= float(_log_softmax(logits)[np.arange(len(y)), y].sum(dtype=np.float64))
            correct += int((logits.argmax(axis=1) == y).sum())
        return total_loss / len(self._x), correct / len(self._x)

    def weights(self) -> Weights:
        return {key: value.copy() for key, value in self._w.items()}


# ---- PyTorch, imported only when asked for --------------------------------------------------


def mlp_torch() -> Any:
    """The PyTorch backend module, imported only once torch is chosen (it imports this one)."""
    return importlib.import_module("workers.workloads.mlp_torch")


def _load_backend(backend: str) -> Any | None:
    """The torch module when training or predicting on torch; None for numpy."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "numpy":
        return None
    try:
        return importlib.import_module("torch")
    except ImportError as error:
        if backend == "torch":
            raise ValueError(
                "backend='torch' needs PyTorch, which is not importable here "
                "(install swarm-broker[torch]), or use backend='numpy' or 'auto'"
            ) from error
        return None
