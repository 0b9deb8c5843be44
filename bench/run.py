"""Swarm's benchmark: the reference echo server, the reference plus one Ray actor call per task
(ray-glue), Swarm end to end and (when importable) Celery and Dramatiq, measured in one run,
interleaved round by round, each round of each system on a fresh RabbitMQ vhost; then
Swarm's `predict` on real rows against the same model called directly in a Ray actor. See
bench/README.md.

    .venv/bin/python bench/run.py --tasks 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predict
from client import BenchError, LoadClient, RunResult, args_for, percentile
from procs import PhasePeak, Rabbit, SharedRay, tool, wait_for_vhost_deletes
from systems import System, importable, make_system

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAYLOAD_LABELS = {"small": "150 B", "1024": "1 KiB", "65536": "64 KiB"}
EXTRAS = ("celery", "dramatiq")
SYSTEMS = ("reference", "ray-glue", "swarm", *EXTRAS)
CEILING = "predict-ceiling"  # not a system: a step of each round when --predict-tasks > 0
MIB = 1024.0
PROFILE_RATE_HZ = 200


def payload_label(payload: str) -> str:
    return PAYLOAD_LABELS.get(payload, f"{payload} B args")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, systems alternating")
    parser.add_argument("--window", type=int, default=256, help="unanswered tasks at most")
    parser.add_argument(
        "--latency-tasks", type=int, default=200, help="tasks sent one at a time per payload"
    )
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured tasks first")
    parser.add_argument(
        "--payloads",
        default="small,1024,65536",
        help="'small' (a 150-byte body) and/or sizes of args in bytes",
    )
    parser.add_argument(
        "--systems",
        default="auto",
        help="comma-separated of reference,ray-glue,swarm,celery,dramatiq; 'auto' = "
        "reference,ray-glue,swarm and whichever of celery/dramatiq is importable",
    )
    parser.add_argument(
        "--predict-tasks",
        type=int,
        default=predict.DEFAULT_TASKS,
        help="predict tasks (64 rows x 128 features each) per round through Swarm and "
        "through the ceiling, one Ray actor calling the model directly (0: off; needs swarm)",
    )
    parser.add_argument(
        "--no-extras", action="store_true", help="never run celery or dramatiq (with 'auto')"
    )
    parser.add_argument(
        "--ray",
        choices=("shared", "embedded"),
        default="shared",
        help="shared: one `ray start --head` for the whole bench, joined by every daemon; "
        "embedded: each daemon starts its own Ray",
    )
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of that Ray")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="RabbitMQ (each round gets a vhost of its own; needs rabbitmqctl)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="JSON path")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the rounds, py-spy the daemon for SECONDS under load (0: off)",
    )
    parser.add_argument(
        "--run-timeout", type=float, default=600.0, help="seconds one run may take at most"
    )
    args = parser.parse_args(argv)
    if args.tasks <= 0 or args.rounds <= 0 or args.window <= 0:
        parser.error("--tasks, --rounds and --window must be positive")
    if args.predict_tasks < 0:
        parser.error("--predict-tasks must be 0 (off) or more")
    args.payloads = [p.strip() for p in args.payloads.split(",") if p.strip()]
    for payload in args.payloads:
        if payload != "small" and not payload.isdigit():
            parser.error(f"bad payload {payload!r}: 'small' or a size in bytes")
    return args


def choose_systems(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    if args.systems != "auto":
        names = [name.strip() for name in args.systems.split(",") if name.strip()]
        unknown = sorted(set(names) - set(SYSTEMS))
        if unknown:
            raise SystemExit(f"bench/run.py: unknown system(s) {', '.join(unknown)}")
    else:
        names = ["reference", "ray-glue", "swarm"]
        for extra in EXTRAS:
            if args.no_extras:
                skipped[extra] = "--no-extras"
            elif importable(extra):
                names.append(extra)
            else:
                skipped[extra] = f"not importable (pip install {extra}: see bench/README.md)"
    for name in names:
        if name in EXTRAS and not importable(name):
            skipped[name] = f"not importable (pip install {name}: see bench/README.md)"
    names = [name for name in names if name not in skipped]
    if "reference" not in names:
        names.insert(0, "reference")  # every ratio is against it
    return names, skipped


# -- one round of one system ----------------------------------------------------------------


async def run_round(
    system: System,
    url: str,
    args: argparse.Namespace,
    round_no: int,
    workload: predict.Workload | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {"system": system.name, "round": round_no, "payloads": {}}
    await system.start(url)
    sampler = None
    try:
        async with LoadClient(url, system.codec) as client:
            record["startup_s"] = round(await system.wait_ready(client), 3)
            sampler = system.sampler().start()
            sampler.phase("warmup")
            await client.run(args.warmup, args.window, args_for("small"), timeout_s=120)
            for payload in args.payloads:
                task_args = args_for(payload)
                sampler.phase(payload)
                saturated = await client.run(
                    args.tasks, args.window, task_args, timeout_s=args.run_timeout
                )
                unloaded = await client.run(
                    args.latency_tasks, 1, task_args, timeout_s=args.run_timeout
                )
                record["payloads"][payload] = {
                    "saturated": saturated,
                    "unloaded": unloaded,
                    "rss": sampler.phases.get(payload, PhasePeak()),
                }
                print(
                    f"  round {round_no + 1} {system.name:<9} {payload_label(payload):>7}: "
                    f"{saturated.tasks_per_s:8.0f} tasks/s  "
                    f"p50 {percentile(saturated.latencies_ms, 50):6.1f} ms saturated, "
                    f"{percentile(unloaded.latencies_ms, 50):5.1f} ms unloaded",
                    flush=True,
                )
            if workload is not None:
                sampler.phase("predict")
                record["predict"] = await predict.run_swarm(
                    url, workload, args.window, args.run_timeout
                )
                print(
                    f"  round {round_no + 1} {system.name:<9} predict: "
                    f"{record['predict']['rows_per_s']:8.0f} rows/s",
                    flush=True,
                )
            sampler.phase("end")
            record.update(await system.describe(client))
    finally:
        if sampler is not None:
            sampler.stop()
            record["rss_peak"] = sampler.overall()
        record["exit_code"] = await asyncio.to_thread(system.stop)
    return record


# -- aggregation -----------------------------------------------------------------------------


def _mib(kib: int) -> float:
    return round(kib / MIB, 1)


def _latency(runs: list[RunResult]) -> dict[str, float]:
    pooled = [value for run in runs for value in run.latencies_ms]
    return {
        "p50": round(percentile(pooled, 50), 2),
        "p99": round(percentile(pooled, 99), 2),
        "samples": len(pooled),
    }


def aggregate(
    records: list[dict[str, Any]], systems: list[str], payloads: list[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    reference: dict[str, float] = {}
    reference_by_round = {
        (r["round"], payload): run["saturated"].tasks_per_s
        for r in records
        if r["system"] == "reference"
        for payload, run in r["payloads"].items()
    }
    for name in systems:
        mine = [r for r in records if r["system"] == name]
        for payload in payloads:
            runs = [r["payloads"][payload] for r in mine if payload in r["payloads"]]
            if not runs:
                continue
            rates = [run["saturated"].tasks_per_s for run in runs]
            # Each round's rate over the reference's in the same round: drift cancels out.
            paired = [
                r["payloads"][payload]["saturated"].tasks_per_s
                / reference_by_round[(r["round"], payload)]
                for r in mine
                if payload in r["payloads"] and reference_by_round.get((r["round"], payload))
            ]
            rate = statistics.median(rates)
            if name == "reference":
                reference[payload] = rate
            rss: list[PhasePeak] = [run["rss"] for run in runs]
            rows.append(
                {
                    "system": name,
                    "payload": payload,
                    "payload_label": payload_label(payload),
                    "args_bytes": len(args_for(payload)),
                    "tasks_per_s": round(rate, 1),
                    "tasks_per_s_rounds": [round(value, 1) for value in rates],
                    "ratio_vs_reference": (
                        round(rate / reference[payload], 3) if reference.get(payload) else None
                    ),
                    "ratio_vs_reference_rounds": [round(value, 3) for value in paired],
                    "latency_ms": {
                        "saturated": _latency([run["saturated"] for run in runs]),
                        "unloaded": _latency([run["unloaded"] for run in runs]),
                    },
                    "rss_peak_mib": {
                        "daemon": _mib(max(p.daemon_kib for p in rss)),
                        "actors": _mib(max(p.actors_kib for p in rss)),
                        "daemon_plus_actors": _mib(max(p.total_kib for p in rss)),
                        "process_tree": _mib(max(p.tree_kib for p in rss)),
                    },
                }
            )
    return rows


def system_summaries(records: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    summaries: dict[str, Any] = {}
    for name in systems:
        mine = [r for r in records if r["system"] == name]
        peaks: list[PhasePeak] = [r["rss_peak"] for r in mine if "rss_peak" in r]
        summaries[name] = {
            "startup_s": [r.get("startup_s") for r in mine],
            "exit_codes": [r.get("exit_code") for r in mine],
            "rss_peak_mib": {
                "daemon": _mib(max((p.daemon_kib for p in peaks), default=0)),
                "actors": _mib(max((p.actors_kib for p in peaks), default=0)),
                "daemon_plus_actors": _mib(max((p.total_kib for p in peaks), default=0)),
                "process_tree": _mib(max((p.tree_kib for p in peaks), default=0)),
                "actor_processes": max((p.actors for p in peaks), default=0),
            },
        }
        pools = [r["pool_actors"] for r in mine if "pool_actors" in r]
        if pools:
            summaries[name]["pool_actors_at_end"] = pools
    return summaries


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "system",
        "payload",
        "tasks/s",
        "min..max",
        "x ref",
        "sat p50",
        "sat p99",
        "1-by-1 p50",
        "1-by-1 p99",
        "RSS MiB",
    )
    lines = [header]
    for row in rows:
        saturated = row["latency_ms"]["saturated"]
        unloaded = row["latency_ms"]["unloaded"]
        rates = row["tasks_per_s_rounds"]
        rss = row["rss_peak_mib"]
        ratio = row["ratio_vs_reference"]
        memory = f"{rss['daemon']:.0f}"
        if rss["actors"]:
            memory += f" (+{rss['actors']:.0f} workers)"
        lines.append(
            (
                row["system"],
                row["payload_label"],
                f"{row['tasks_per_s']:.0f}",
                f"{min(rates):.0f}..{max(rates):.0f}",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{saturated['p50']:.1f}",
                f"{saturated['p99']:.1f}",
                f"{unloaded['p50']:.2f}",
                f"{unloaded['p99']:.2f}",
                memory,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def write_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of tasks/s and latency per system and payload, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    systems = list(dict.fromkeys(row["system"] for row in rows))
    payloads = list(dict.fromkeys(row["payload_label"] for row in rows))
    by_key = {(row["system"], row["payload_label"]): row for row in rows}
    figure, (rate_axis, latency_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(systems))
    for index, system in enumerate(systems):
        positions = [p + index * width for p in range(len(payloads))]
        rates = [by_key.get((system, p), {}).get("tasks_per_s", 0) for p in payloads]
        p50s = [
            by_key[(system, p)]["latency_ms"]["saturated"]["p50"] if (system, p) in by_key else 0
            for p in payloads
        ]
        rate_axis.bar(positions, rates, width, label=system)
        latency_axis.bar(positions, p50s, width, label=system)
    for axis, title in (
        (rate_axis, "tasks/s (higher is better)"),
        (latency_axis, "p50 ms at saturation"),
    ):
        axis.set_xticks([p + 0.4 - width / 2 for p in range(len(payloads))], payloads)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _to_json(value: Any) -> Any:
    if isinstance(value, PhasePeak):
        return {
            "daemon_mib": _mib(value.daemon_kib),
            "actors_mib": _mib(value.actors_kib),
            "daemon_plus_actors_mib": _mib(value.total_kib),
            "process_tree_mib": _mib(value.tree_kib),
            "actor_processes": value.actors,
        }
    if isinstance(value, RunResult):
        return {
            "tasks": value.tasks,
            "window": value.window,
            "seconds": round(value.seconds, 4),
            "tasks_per_s": round(value.tasks_per_s, 1),
            "p50_ms": round(percentile(value.latencies_ms, 50), 2),
            "p99_ms": round(percentile(value.latencies_ms, 99), 2),
        }
    raise TypeError(f"not JSON: {type(value).__name__}")


# -- profiling -------------------------------------------------------------------------------


async def profile_daemon(
    args: argparse.Namespace, rabbit: Rabbit, ray: SharedRay | None, log_dir: Path
) -> dict[str, Any]:
    """py-spy the daemon for `args.profile` seconds while the client keeps it saturated with
    150-byte tasks; the collapsed stacks go to results/daemon-profile.txt."""
    import profile_report

    py_spy = tool("py-spy")
    if not os.access(py_spy, os.X_OK):
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    raw = args.out.parent / "daemon-profile.txt"
    with rabbit.fresh_vhost("profile") as url:
        system = make_system("swarm", log_dir, "profile", ray, args.ray_cpus)
        await system.start(url)
        try:
            async with LoadClient(url, system.codec) as client:
                await system.wait_ready(client)
                await client.run(args.warmup, args.window, args_for("small"), timeout_s=120)
                spy = await asyncio.create_subprocess_exec(
                    py_spy,
                    "record",
                    "--pid",
                    str(system.pid),
                    "--duration",
                    str(int(args.profile)),
                    "--rate",
                    str(PROFILE_RATE_HZ),
                    "--format",
                    "raw",
                    "--threads",
                    "--full-filenames",
                    "--nonblocking",
                    "--output",
                    str(raw),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                done = 0
                started = time.perf_counter()
                while spy.returncode is None:
                    await client.run(
                        args.tasks, args.window, args_for("small"), timeout_s=args.run_timeout
                    )
                    done += args.tasks
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(spy.wait(), 0.01)
                _, err = await spy.communicate()
                elapsed = time.perf_counter() - started
        finally:
            await asyncio.to_thread(system.stop)
    if spy.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {err.decode(errors='replace').strip()[-500:]}"}
    report = profile_report.analyse(raw.read_text(), PROFILE_RATE_HZ, int(args.profile))
    report["tasks"] = done
    report["tasks_per_s_while_profiled"] = round(done / elapsed, 1)
    report["collapsed_stacks"] = str(raw)
    return report


# -- main ------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> int:
    systems, skipped = choose_systems(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    rabbit = Rabbit(args.amqp_url)
    ray: SharedRay | None = None
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    profile: dict[str, Any] | None = None
    predict_records: list[dict[str, Any]] = []
    workload: predict.Workload | None = None
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = [round(x, 2) for x in os.getloadavg()]
    if load_start[0] > 0.5:
        print(
            f"note: load average {load_start[0]:.2f} before the bench: other work on this "
            "machine makes the numbers noisy",
            flush=True,
        )
    print(
        f"systems {', '.join(systems)}; {args.rounds} round(s) of {args.tasks} tasks "
        f"(window {args.window}) per payload {', '.join(map(payload_label, args.payloads))}"
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
        + (
            f"; {args.predict_tasks} predict tasks per round"
            if args.predict_tasks and "swarm" in systems
            else ""
        ),
        flush=True,
    )
    try:
        if {"swarm", "ray-glue"} & set(systems) and args.ray == "shared":
            ray = await asyncio.to_thread(SharedRay(args.ray_cpus).start, log_dir / "ray.log")
            print(f"  ray head at {ray.address} up in {ray.start_s:.1f} s", flush=True)
        if args.predict_tasks and "swarm" in systems:
            model_dir = Path(tempfile.mkdtemp(prefix="swb-models-", dir="/tmp"))
            workload = await asyncio.to_thread(
                predict.Workload.prepare, model_dir, args.predict_tasks
            )
        steps = [*systems, CEILING] if workload is not None else systems
        for round_no in range(args.rounds):
            order = steps if round_no % 2 == 0 else steps[::-1]
            for name in order:
                tag = f"r{round_no + 1}"
                try:
                    if name == CEILING:
                        assert workload is not None
                        ceiling = await predict.run_ceiling(
                            workload, ray, args.ray_cpus, log_dir, tag
                        )
                        predict_records.append({"system": CEILING, "round": round_no, **ceiling})
                        print(
                            f"  round {round_no + 1} {CEILING}: "
                            f"{ceiling['rows_per_s']:8.0f} rows/s",
                            flush=True,
                        )
                        continue
                    with rabbit.fresh_vhost(name) as url:
                        model_dir = workload.model_dir if workload is not None else None
                        system = make_system(name, log_dir, tag, ray, args.ray_cpus, model_dir)
                        swarm_predict = workload if name == "swarm" else None
                        record = await run_round(system, url, args, round_no, swarm_predict)
                        records.append(record)
                        if "predict" in record:
                            predict_records.append(
                                {"system": name, "round": round_no, **record["predict"]}
                            )
                except (BenchError, RuntimeError) as exc:
                    errors.append(f"round {round_no + 1} {name}: {exc}")
                    print(f"  round {round_no + 1} {name}: FAILED: {exc}", flush=True)
        if args.profile > 0 and "swarm" in systems:
            try:
                profile = await profile_daemon(args, rabbit, ray, log_dir)
            except (BenchError, RuntimeError) as exc:
                errors.append(f"profile: {exc}")
    finally:
        if ray is not None:
            await asyncio.to_thread(ray.stop)
        if workload is not None:
            shutil.rmtree(workload.model_dir, ignore_errors=True)
        await asyncio.to_thread(wait_for_vhost_deletes)

    rows = aggregate(records, systems, args.payloads)
    predict_rows = predict.aggregate(predict_records)
    summaries = system_summaries(records, systems)
    print()
    print(format_table(rows))
    if predict_rows:
        print()
        print(predict.format_table(predict_rows))
    for name, summary in summaries.items():
        rss = summary["rss_peak_mib"]
        startup = [s for s in summary["startup_s"] if s is not None]
        line = f"{name}: ready in {statistics.median(startup):.1f} s" if startup else name
        line += f", peak RSS {rss['daemon']:.0f} MiB"
        if rss["actor_processes"]:
            line += (
                f" (+ {rss['actors']:.0f} MiB in {rss['actor_processes']} worker process(es), "
                f"{rss['daemon_plus_actors']:.0f} MiB together)"
            )
        print(line)
    if profile is not None:
        import profile_report

        print()
        print(profile_report.format_report(profile))

    result: dict[str, Any] = {
        "meta": {
            "started_at": started_at,
            "seconds": round(time.monotonic() - started, 1),
            "tasks": args.tasks,
            "rounds": args.rounds,
            "window": args.window,
            "latency_tasks": args.latency_tasks,
            "warmup": args.warmup,
            "payloads": args.payloads,
            "predict_tasks": args.predict_tasks if workload is not None else 0,
            "systems": systems,
            "ray": args.ray,
            "ray_cpus": args.ray_cpus,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "rabbitmq": _rabbitmq_version(),
            "git": _git_head(),
            "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "skipped": skipped,
        "results": rows,
        "predict": {
            "model": {
                "features": predict.FEATURES,
                "hidden": predict.HIDDEN,
                "classes": predict.CLASSES,
                **(workload.model if workload is not None else {}),
            },
            "rows_per_task": predict.ROWS_PER_TASK,
            "results": predict_rows,
            "rounds": predict_records,
        },
        "systems": summaries,
        "rounds": records,
        "errors": errors,
    }
    if profile is not None:
        result["profile"] = profile
    args.out.write_text(json.dumps(result, indent=2, default=_to_json) + "\n")
    chart = write_chart(rows, args.out.with_suffix(".png")) if rows else None
    print(f"\nwrote {args.out}" + (f" and {chart}" if chart else ""))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def _git_head() -> str | None:
    with contextlib.suppress(Exception):
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
            timeout=10,
            check=False,
        )
        return done.stdout.strip() or None
    return None


def _rabbitmq_version() -> str | None:
    with contextlib.suppress(Exception):
        done = subprocess.run(
            ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=60, check=False
        )
        return done.stdout.strip() or None
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(bench(args))
    return uvloop.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
