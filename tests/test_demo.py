"""The README's main job: the demo producer against a daemon with the default handlers."""

import io
import re
import sys
from pathlib import Path

from conftest import DaemonFactory
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from demo import fresh_points, run_demo


async def test_demo_trains_predicts_and_aggregates(
    start_daemon: DaemonFactory, amqp_url: str, tmp_path: Path
) -> None:
    await start_daemon(model_dir=tmp_path / "models")
    output = io.StringIO()
    steps = await run_demo(amqp_url, Console(file=output, width=200))
    shown = output.getvalue()
    print(shown)
    assert [handler for handler, _ in steps] == ["train"] + ["predict"] * 8 + ["aggregate"]
    assert all(reply.status == "ok" for _, reply in steps), [r.error for _, r in steps]
    assert "epoch  80/80" in shown, "training progress was shown live"
    # The count shown is the one the replies give: the predictions scored here against the
    # true classes of the same fresh points, and most of them right.
    _, truth = fresh_points(64)
    predictions = [label for _, reply in steps[1:9] for label in reply.result["predictions"]]
    right = sum(label == want for label, want in zip(predictions, truth, strict=True))
    assert right >= 0.9 * 64, predictions
    shown_counts = re.findall(r"(\d+) of 64 fresh points classified correctly", shown)
    assert shown_counts == [str(right)], shown_counts
    train = steps[0][1].result
    assert train["accuracy"] >= 0.9
    regions = {group["region"] for group in steps[-1][1].result["groups"]}
    assert regions == {"eu-west", "us-east", "ap-south"}
    for title in ("training", "inference", "data processing"):
        assert title in shown
