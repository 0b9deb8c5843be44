# The Swarm image: the daemon (`swarm run`, the default command) and, with `ray start`, every
# Ray node of a cluster, so that all of them run the same Ray, Python and handler code.
#
#   docker build -t swarm-broker .
#   docker build -t swarm-broker --build-arg EXTRAS=torch .   # + PyTorch (CUDA on Linux x86_64)
#
# BASE_IMAGE must provide Python 3.11 (`python`, `pip`) on Debian or Ubuntu. PyPI's Linux x86_64
# torch wheels bring their own CUDA runtime, so a GPU node needs no CUDA base image: only the
# NVIDIA driver and Container Toolkit on the host.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Comma-separated extras installed besides `daemon` and `fast` (uvloop), e.g. `torch`.
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    RAY_USAGE_STATS_ENABLED=0 \
    SWARM_MODEL_DIR=/models

# /models is created here, owned by the runtime user, so that a named volume mounted there
# starts with that ownership.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin swarm \
    && install -d -o swarm -g swarm /models

WORKDIR /opt/swarm

# The dependencies first, from pyproject.toml alone: this layer (Ray, numpy, torch) is rebuilt
# only when the dependencies or EXTRAS change, not on every change to the code.
COPY pyproject.toml ./
RUN python -c 'import sys, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e.strip() for e in ("daemon,fast," + sys.argv[1]).split(",") if e.strip()]; \
print("\n".join(project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]))' \
    "$EXTRAS" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself; its dependencies are in place, so this layer is quick. README.md is
# the package's readme.
COPY README.md ./
COPY schemas ./schemas
COPY workers ./workers
COPY broker ./broker
RUN pip install ".[daemon,fast${EXTRAS:+,$EXTRAS}]" \
    && rm -rf build ./*.egg-info

USER swarm
WORKDIR /home/swarm

# /metrics, /healthz and /readyz (SWARM_METRICS_PORT).
EXPOSE 9464

CMD ["swarm", "run"]
