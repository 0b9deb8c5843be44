#!/usr/bin/env bash
# The main job: start the daemon (embedded local Ray unless RAY_ADDRESS is set), show it working
# with a demo producer, then keep the daemon in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/swarm run &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' EXIT INT TERM
.venv/bin/python examples/demo.py || echo "The demo did not finish: see above (the daemon keeps running)."
echo "The daemon keeps running: try  .venv/bin/swarm submit inference echo --args '{\"x\": 1}'"
echo "Ctrl-C stops it."
wait $daemon
