"""The PyTorch backend of workers/workloads/mlp.py: the same network, weights and batches,
on the GPU when asked for and present. Imported only once torch is chosen."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.workloads.mlp import WEIGHT_KEYS, Floats, Labels, Weights, row_chunks, widest


def device(torch: Any, use_gpu: bool) -> Any:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _logits(torch: Any, params: Mapping[str, Any], x: Any) -> Any:
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


class TorchNet:
    def __init__(self, torch: Any, device: Any, weights: Weights, x: Floats, y: Labels) -> None:
        self._torch = torch
        self._params = {
            key: torch.tensor(value, device=device, requires_grad=True)
            for key, value in weights.items()
        }
        # torch.tensor copies: the caller's arrays may be read-only, which from_numpy warns on.
        self._x = torch.tensor(x, device=device)
        self._y = torch.tensor(y, device=device)
        self._widest = widest(weights)
        self.device = str(self._x.device)

    def run_epoch(self, order: npt.NDArray[np.int64], batch_size: int, lr: float) -> None:
        torch, params = self._torch, self._params
        order_on_device = torch.from_numpy(order).to(self._x.device)
        tensors = [params[key] for key in WEIGHT_KEYS]
        for start in range(0, len(order), batch_size):
            rows = order_on_device[start : start + batch_size]
            logits = _logits(torch, params, self._x[rows])
            loss = torch.nn.functional.cross_entropy(logits, self._y[rows])
            grads = torch.autograd.grad(loss, tensors)
            with torch.no_grad():
                for tensor, grad in zip(tensors, grads, strict=True):
                    tensor.sub_(grad, alpha=lr)

    def evaluate(self) -> tuple[float, float]:
        torch, samples = self._torch, len(self._x)
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for rows in row_chunks(samples, self._widest):
                logits, y = _logits(torch, self._params, self._x[rows]), self._y[rows]
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                total_loss += float(loss.item())
                correct += int((logits.argmax(dim=1) == y).sum().item())
        return total_loss / samples, correct / samples

    def weights(self) -> Weights:
        return {
            key: value.detach().cpu().numpy().astype(np.float32, copy=True)
            for key, value in self._params.items()
        }


def predict(torch: Any, device: Any, weights: Weights, x: Floats) -> tuple[Labels, Floats]:
    params = {key: torch.tensor(value, device=device) for key, value in weights.items()}
    labels = np.empty(len(x), dtype=np.int64)
    probabilities = np.empty((len(x), weights["w2"].shape[1]), dtype=np.float32)
    with torch.no_grad():
        for rows in row_chunks(len(x), widest(weights)):
            logits = _logits(torch, params, torch.tensor(x[rows], device=device))
            labels[rows] = logits.argmax(dim=1).cpu().numpy()
            probabilities[rows] = torch.softmax(logits, dim=1).cpu().numpy()
    return labels, probabilities
