# One slim image for every fleetbus role: hub, agent, tui and the CLI tools.
#   docker build -t fleetbus .
#   docker run --rm fleetbus --help
# docker-compose.yml shows the roles together. The entrypoint (deploy/docker-entrypoint.sh)
# reads secrets from FLEET_*_FILE and then runs `fleet` as the unprivileged user `fleet`;
# only the agent runs as root (FLEET_RUN_AS=root): it installs packages (apt, dnf, dpkg),
# restarts services and loads kernel modules, which an unprivileged user cannot do.
#
# BASE: any image with Python 3.11, pip and `python` on PATH (default python:3.11-slim). An
# air-gapped builder passes a locally loaded one (docker build --build-arg BASE=...), with a pip
# configured for a local wheelhouse; tests/lab builds one from a Debian root that way.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY bus ./bus
COPY hub ./hub
COPY edge_agent ./edge_agent
COPY tui ./tui
COPY cli ./cli
COPY broker_config ./broker_config
# The agent runs with PYTHONOPTIMIZE=2 (docker-compose.yml): compile for it at build time,
# since the image writes no bytecode at run time.
RUN pip install . \
    && { python -OO -m compileall -q /usr/local/lib/python3.11/site-packages > /dev/null || true; } \
    && rm -rf /build \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/fleet --create-home \
        --shell /usr/sbin/nologin fleet \
    && install -d -o fleet -g fleet -m 0750 /var/lib/fleet-hub \
    && install -d -m 0700 /var/lib/fleet-agent

COPY deploy/docker-entrypoint.sh /usr/local/bin/fleet-entrypoint
WORKDIR /var/lib/fleet
ENTRYPOINT ["fleet-entrypoint"]
CMD ["--help"]
