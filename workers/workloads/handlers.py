"""The built-in workloads, one per task type, loaded by default (SWARM_HANDLER_MODULES):

- `train` (training): an MLP classifier trained on the data given, or on data generated from
  a seed; loss and accuracy reported as progress; the weights stored in the model store
  under `model`, where `predict` finds them.
- `predict` (inference): the stored model, loaded once per actor and reloaded when a newer
  version is saved; queued tasks run as one batched call; the GPU when the actor has one.
- `aggregate` (data_processing): filters, group-by and aggregations over records or columns,
  vectorised with numpy.

PyTorch does the training and inference where it is installed (`pip install
swarm-broker[torch]`), numpy otherwise; either backend reads the other's weights.
"""

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.context import ActorContext, TaskContext
from workers.registry import handler
from workers.workloads import mlp, table
from workers.workloads.store import NAME_PATTERN, ModelNotFound, ModelStore

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "swarm" / "models"


def model_store() -> ModelStore:
    """The daemon's SWARM_MODEL_DIR, which every actor gets in its environment."""
    return ModelStore(Path(os.environ.get("SWARM_MODEL_DIR") or DEFAULT_MODEL_DIR))


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


ModelName = Field(pattern=f"^{NAME_PATTERN.pattern}$")


class Generate(Args):
    samples: int = Field(default=600, ge=2, le=1_000_000)
    features: int = Field(default=8, ge=1, le=4096)
    classes: int = Field(default=3, ge=2, le=1000)
    seed: int = Field(default=0, ge=0)


class TrainArgs(Args):
    model: str = ModelName
    x: list[list[float]] | None = None
    y: list[int] | None = None
    generate: Generate | None = None
    hidden: int = Field(default=32, ge=1, le=4096)
    epochs: int = Field(default=60, ge=1, le=10_000)
    lr: float = Field(default=0.1, gt=0, le=10)
    # Rows per gradient step. Larger batches keep a GPU busy; tiny ones leave it waiting on
    # kernel launches.
    batch_size: int = Field(default=64, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0)
    # Progress every n epochs (and after the last); 0 reports only the end.
    report_every: int = Field(default=10, ge=0)
    return_weights: bool = False

    @model_validator(mode="after")
    def _data_or_generate(self) -> "TrainArgs":
        given = self.x is not None or self.y is not None
        if given == (self.generate is not None) or (given and (self.x is None or self.y is None)):
            raise ValueError("give either both `x` and `y`, or `generate`")
        return self


@handler("train", types=["training"])
def train(args: TrainArgs, ctx: TaskContext) -> dict[str, Any]:
    x: Any
    y: Any
    if args.generate is not None:
        spec = args.generate
        x, y = mlp.generate_dataset(spec.samples, spec.features, spec.classes, spec.seed)
    else:
        x, y = args.x, args.y

    def on_epoch(epoch: int, loss: float, accuracy: float) -> None:
        every = args.report_every
        if epoch == args.epochs or (every and epoch % every == 0):
            ctx.progress({"epoch": epoch, "of": args.epochs, "loss": loss, "accuracy": accuracy})

    result = mlp.train(
        x,
        y,
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        use_gpu=ctx.has_gpu,
        on_epoch=on_epoch,
    )
    shape = {key: list(value.shape) for key, value in result.weights.items()}
    stored = model_store().save(
        args.model,
        result.weights,
        {
            "task_id": ctx.task_id,
            "loss": result.loss,
            "accuracy": result.accuracy,
            "backend": result.backend,
            "shape": shape,
        },
    )
    answer: dict[str, Any] = {
        "model": args.model,
        "version": stored.version,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "epochs": result.epochs,
        "backend": result.backend,
        "device": result.device,
        "features": shape["w1"][0],
        "classes": shape["w2"][1],
    }
    if args.return_weights:
        answer["weights"] = {key: value.tolist() for key, value in result.weights.items()}
    return answer


class PredictArgs(Args):
    model: str = ModelName
    inputs: list[list[float]] = Field(min_length=1)


class ModelCache:
    """Models this actor has loaded, by name; a model is read again only when the store has
    a newer version of it."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self._models: dict[str, tuple[int, dict[str, Any]]] = {}

    def get(self, name: str) -> tuple[int, dict[str, Any]]:
        version = self._store.version(name)
        if version is None:
            raise ModelNotFound(name, self._store.root)
        cached = self._models.get(name)
        if cached is None or cached[0] != version:
            weights, _ = self._store.load(name)
            cached = self._models[name] = (version, weights)
        return cached


def _open_model_cache(actor: ActorContext) -> ModelCache:
    return ModelCache(model_store())


@handler("predict", types=["inference"], batch_max=64, batch_wait_ms=5, setup=_open_model_cache)
def predict(batch: list[PredictArgs], ctx: ActorContext) -> list[Any]:
    """All queued tasks for one model go through the model as one call (one GPU call)."""
    cache: ModelCache = ctx.state
    answers: list[Any] = [None] * len(batch)
    by_model: dict[str, list[int]] = {}
    for index, item in enumerate(batch):
        by_model.setdefault(item.model, []).append(index)
    for name, indices in by_model.items():
        try:
            version, weights = cache.get(name)
            rows = [row for index in indices for row in batch[index].inputs]
            labels, probabilities = mlp.predict(weights, rows, use_gpu=ctx.has_gpu)
        except (ModelNotFound, ValueError) as exc:
            for index in indices:
                answers[index] = exc  # fails these tasks alone (workers/batching.py)
            continue
        start = 0
        for index in indices:
            end = start + len(batch[index].inputs)
            answers[index] = {
                "model": name,
                "version": version,
                "predictions": labels[start:end].tolist(),
                "probabilities": [
                    [round(p, 6) for p in row] for row in probabilities[start:end].tolist()
                ],
                "batch": len(batch),
            }
            start = end
    return answers


Comparison = list[Any]


class AggregateArgs(Args):
    records: list[dict[str, Any]] | None = None
    columns: dict[str, list[Any]] | None = None
    group_by: list[str] = Field(default_factory=list)
    metrics: dict[str, list[str]]
    where: list[Comparison] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "AggregateArgs":
        if (self.records is None) == (self.columns is None):
            raise ValueError("give exactly one of `records` and `columns`")
        return self


@handler("aggregate", types=["data_processing"])
def aggregate(args: AggregateArgs) -> dict[str, Any]:
    data: Any = args.records if args.records is not None else args.columns
    return table.aggregate(data, group_by=args.group_by, metrics=args.metrics, where=args.where)
