# Debian's mosquitto, for docker-compose.yml where eclipse-mosquitto:2 cannot be pulled:
#   docker build -f deploy/mosquitto.Dockerfile -t fleetbus-mosquitto deploy
#   FLEET_MOSQUITTO_IMAGE=fleetbus-mosquitto docker compose up -d
# BASE: debian:bookworm-slim, or a local Debian image (nothing is fetched when it already
# has mosquitto and nc, which the compose health check uses).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN if ! command -v mosquitto >/dev/null || ! command -v nc >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto netcat-openbsd \
        && rm -rf /var/lib/apt/lists/*; \
    fi
EXPOSE 1883
CMD ["mosquitto", "-c", "/fleet/broker/mosquitto.conf"]
