"""Where the `swarm` console script enters. The command (broker/cli/root.py) needs the daemon
extra; in a client-only install (`pip install swarm-broker`, for producers) it says so in
one line and exits with status 1, instead of an import traceback."""

import sys
from importlib.util import find_spec

# What `pip install 'swarm-broker[daemon]'` adds, by import name.
DAEMON_MODULES = (
    "typer",
    "rich",
    "structlog",
    "pydantic_settings",
    "ray",
    "numpy",
    "prometheus_client",
)


def missing_daemon_modules() -> list[str]:
    return [name for name in DAEMON_MODULES if find_spec(name) is None]


def main() -> None:
    missing = missing_daemon_modules()
    if missing:
        sys.exit(
            f"swarm: the command needs the daemon extra ({', '.join(missing)} not installed):"
            " pip install 'swarm-broker[daemon]'"
        )
    from broker.cli.root import app

    app()


if __name__ == "__main__":
    main()
