"""Hot spots from py-spy's collapsed stacks (`py-spy record --format raw --threads`).

Each line is `thread (TID): NAME;frame;...;frame COUNT`, a frame `function (file:line)`.
Reported, as % of all samples: self time by function (the innermost frame), inclusive time
by function (once per stack), Swarm's own functions (broker/, schemas/, workers/) inclusive,
self time by package, and each thread's share.

    python bench/profile_report.py bench/results/daemon-profile.txt [RATE_HZ DURATION_S]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
SWARM_PACKAGES = ("broker", "schemas", "workers")
TOP = 15


def short_path(path: str) -> str:
    """site-packages/aio_pika/queue.py -> aio_pika/queue.py; /work/x/broker/a.py -> broker/a.py"""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    parts = Path(path).parts
    for index, part in enumerate(parts):
        if part in SWARM_PACKAGES:
            return "/".join(parts[index:])
    if "/lib/python3" in path:
        return "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return Path(path).name if path else "?"


def package_of(file: str) -> str:
    if file == "asyncio/runners.py (uvloop)":
        return "event loop (uvloop, native)"
    head = file.split("/", 1)[0]
    if head == "stdlib":
        rest = file.split("/", 1)[1] if "/" in file else file
        return "asyncio (stdlib)" if rest.startswith("asyncio/") else "stdlib (other)"
    return head.removesuffix(".py")


def parse_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame)
    if match is None:
        return frame, "?"
    function, file = match["function"], short_path(match["file"])
    if function == "Runner.run" and file.endswith("asyncio/runners.py"):
        # uvloop's loop is compiled: time inside it (polling, callbacks' bookkeeping, the
        # transports' writes) shows as the innermost Python frame that entered it.
        return "event loop (uvloop, native)", "asyncio/runners.py (uvloop)"
    return function, file


def analyse(text: str, rate_hz: float = 0.0, duration_s: float = 0.0) -> dict[str, Any]:
    """The report; with the sampling rate and duration, each thread's busy share of the wall
    time too (py-spy without --idle samples a thread only while it runs)."""
    total = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    swarm: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread = frames.pop(0).split(": ", 1)[-1]
        total += count
        threads[thread] += count
        if not frames:
            continue
        names = []
        for frame in frames:
            function, file = parse_frame(frame)
            names.append((f"{function} ({file})", file))
        leaf, leaf_file = names[-1]
        self_time[leaf] += count
        packages[package_of(leaf_file)] += count
        for name in {name for name, _ in names}:
            inclusive[name] += count
        for name in {name for name, file in names if file.startswith(SWARM_PACKAGES)}:
            swarm[name] += count

    def top(counter: Counter[str], n: int = TOP) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": samples, "percent": round(100.0 * samples / total, 1)}
            for name, samples in counter.most_common(n)
        ]

    # Frames on (nearly) every stack: the process's entry chain, which says nothing.
    roots = max(inclusive.values(), default=0)
    for name in [name for name, samples in inclusive.items() if samples >= 0.99 * roots]:
        del inclusive[name]
    for name in [name for name, samples in swarm.items() if samples >= 0.99 * roots]:
        del swarm[name]
    thread_rows = top(threads, 8)
    if rate_hz > 0 and duration_s > 0:
        for row in thread_rows:
            row["busy_percent"] = round(100.0 * row["samples"] / (rate_hz * duration_s), 1)
    return {
        "samples": total,
        "rate_hz": rate_hz,
        "duration_s": duration_s,
        "threads": thread_rows,
        "self": top(self_time),
        "inclusive": top(inclusive, 25),
        "swarm_inclusive": top(swarm, 20),
        "packages_self": top(packages, 12),
    }


def format_report(report: dict[str, Any]) -> str:
    if "error" in report:
        return f"profile: {report['error']}"
    lines = [
        f"daemon profile: {report['samples']} samples"
        + (
            f" while it answered {report['tasks_per_s_while_profiled']:.0f} tasks/s"
            if "tasks_per_s_while_profiled" in report
            else ""
        )
        + (f" ({report['collapsed_stacks']})" if "collapsed_stacks" in report else "")
    ]
    sections = (
        ("threads", "by thread"),
        ("packages_self", "self time by package"),
        ("self", "self time by function"),
        ("swarm_inclusive", "Swarm's functions, inclusive"),
        ("inclusive", "all functions, inclusive"),
    )
    for key, title in sections:
        lines.append(f"  {title}:")
        for entry in report[key][:TOP]:
            busy = entry.get("busy_percent")
            note = f"  (busy {busy:.0f}% of the wall time)" if busy is not None else ""
            lines.append(f"    {entry['percent']:5.1f}%  {entry['function']}{note}")
    return "\n".join(lines)


if __name__ == "__main__":
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    duration = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    print(format_report(analyse(Path(sys.argv[1]).read_text(), rate, duration)))
