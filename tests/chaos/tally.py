"""Counting what a fault did: tasks sent, replies, lost and duplicated, printed per fault."""

import os
from dataclasses import dataclass, field

from raw import Inbox

# CI runs the suite reduced; `CHAOS_TASKS=2000 pytest tests/chaos` runs it full size.
CHAOS_TASKS = int(os.environ.get("CHAOS_TASKS", "200"))


@dataclass
class Tally:
    fault: str
    inbox: Inbox
    sent: list[str] = field(default_factory=list)

    def answered(self) -> set[str]:
        return self.inbox.distinct_ids() & set(self.sent)

    async def all_answered(self, timeout_s: float = 240.0) -> None:
        wanted = set(self.sent)
        await self.inbox.wait_until(lambda _: wanted <= self.inbox.distinct_ids(), timeout_s)

    def report(self) -> dict[str, int]:
        replies = sum(1 for r in self.inbox.messages if r.payload["id"] in set(self.sent))
        distinct = len(self.answered())
        figures = {
            "sent": len(self.sent),
            "replies": replies,
            "lost": len(self.sent) - distinct,
            "duplicated": replies - distinct,
        }
        print(f"chaos fault={self.fault} " + " ".join(f"{k}={v}" for k, v in figures.items()))
        return figures
