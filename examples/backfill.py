"""Backfill from Python: send every task of a JSONL file, resumably, at a bounded rate.

    AMQP_URL=amqp://guest:guest@localhost:5672/ python examples/backfill.py \
        examples/backfill-sample.jsonl

Run it twice: the second run finds every id in `<file>.done` and sends nothing. The same as
`swarm backfill FILE --rate 50 --window 16`.
"""

import asyncio
import os
import sys
from pathlib import Path

from rich.progress import Progress

from broker.producer.backfill import BackfillProgress, backfill
from broker.producer.client import SwarmClient

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")


async def main(source: Path) -> int:
    with Progress() as bar:
        lines = bar.add_task(f"backfill {source.name}", total=None)

        def show(step: BackfillProgress) -> None:
            # Lines skipped (already done) and lines answered both move the bar.
            bar.update(lines, completed=step.finished, total=step.total)
            if step.event == "invalid":
                bar.console.print(f"line {step.line}: invalid, see the errors file")

        async with SwarmClient(URL) as client:
            summary = await backfill(
                client,
                source,
                state=None,  # <source>.done
                rate_per_s=50.0,  # at most 50 tasks sent per second
                window=16,  # at most 16 unanswered at a time
                on_progress=show,
            )
    print(
        f"sent {summary.sent}, skipped {summary.skipped} (already done), ok {summary.ok}, "
        f"errors {summary.errors or 0}, invalid lines {len(summary.invalid)}, "
        f"{summary.elapsed_s:.1f} s"
    )
    for invalid in summary.invalid:
        print(f"  line {invalid.line}: {invalid.reason}")
    return 0 if summary.complete else 1


if __name__ == "__main__":
    default = Path(__file__).with_name("backfill-sample.jsonl")
    sys.exit(asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)))
