"""The README's "Your first handler", as written: its module, run beside the built-in
workloads from a directory on PYTHONPATH, answered through the CLI (real RabbitMQ and Ray)."""

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

from daemon_process import SWARM, DaemonProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def walkthrough_module() -> str:
    """The first python block of the README's "Your first handler" section."""
    section = README.read_text().split("## Your first handler", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the walkthrough lost its handler module"
    return match.group(1)


async def submit(amqp_url: str, args: str) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        SWARM,
        "submit",
        "data_processing",
        "shout",
        "--args",
        args,
        env={**os.environ, "AMQP_URL": amqp_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess([], process.returncode, out.decode(), err.decode())


async def test_the_readme_walkthrough_runs_as_written(amqp_url: str, tmp_path: Path) -> None:
    (tmp_path / "shout.py").write_text(walkthrough_module())
    # Ray embedded, as the walkthrough runs it: its actors get the daemon's PYTHONPATH (a
    # cluster's nodes would need the module installed).
    daemon = DaemonProcess(amqp_url, "", handler_modules="workers.workloads.handlers,shout")
    daemon.env["PYTHONPATH"] = str(tmp_path)
    await daemon.start()
    try:
        ready = next(entry for entry in daemon.log if entry["event"] == "daemon_ready")
        assert {"shout", "train", "predict", "aggregate"} <= set(ready["handlers"])
        done = await submit(amqp_url, '{"text": "hello"}')
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert (reply["status"], reply["result"]) == ("ok", "HELLO!")
        wrong = await submit(amqp_url, '{"txt": "hello"}')
        assert json.loads(wrong.stdout)["error"]["code"] == "invalid"
    finally:
        daemon.terminate()
        assert await daemon.wait() == 0
