#!/bin/sh
# Entrypoint of the fleetbus image (see Dockerfile and docker-compose.yml).
#
#   FLEET_<NAME>_FILE=PATH  exports FLEET_<NAME> from the file's first line, so a secret
#                           (the broker URL holds a password) never sits in the compose
#                           file or in a process's argv: FLEET_BROKER_FILE=/run/secrets/hub-url
#   FLEET_RUN_AS=fleet|root the account the command runs as (default: fleet, unprivileged).
#                           Only the agent needs root: it installs packages (apt, dnf, dpkg),
#                           manages services and loads kernel modules.
#   demo-agent [ARGS]       `fleet agent` with the demo service (cli/demo_assets) seeded in
#                           its state dir on first start; FLEET_NODE_ID names the node.
#   anything else           `fleet ARGS` (hub, tui, nodes, rollout, ...).
#
# It starts as root only to read the secrets, hand them and the state volumes to the
# unprivileged account, and then drops root for good (setpriv, no new privileges).
set -eu

run_as=${FLEET_RUN_AS:-fleet}

file=
for var in $(env | sed -n 's/^\(FLEET_[A-Z0-9_]*\)_FILE=.*/\1/p'); do
    eval "file=\${${var}_FILE}"  # var is [A-Z0-9_] only: safe to eval
    value=$(head -n 1 "$file")
    export "$var=$value"
    unset "${var}_FILE"
done

if [ "${1:-}" = demo-agent ]; then
    shift
    state=${FLEET_STATE_DIR:-/var/lib/fleet-agent}
    scripts=$state/scripts
    if [ ! -f "$state/agent.toml" ]; then
        assets=$(python3 -c 'import os, cli.demo_assets as a; print(os.path.dirname(a.__file__))')
        mkdir -p "$state/app" "$scripts"
        for name in demo_service.py check_app.sh install_update.sh rollback.sh; do
            install -m 0755 "$assets/$name" "$scripts/$name"
        done
        echo '{"version": "1.0"}' > "$state/app/version.json"
        echo "${DEMO_PORT:-8000}" > "$state/app/port"
        cat > "$state/agent.toml" <<TOML
[agent]
state_dir = "$state"
scripts_dir = "$scripts"

[agent.services.demo-app]
command = ["python3", "$scripts/demo_service.py"]
version_file = "$state/app/version.json"
env = { DEMO_PORT = "${DEMO_PORT:-8000}", DEMO_HW = "${DEMO_HW:-rev-b}", FLEET_STATE_DIR = "$state" }
TOML
    fi
    set -- agent --config "$state/agent.toml" "$@"
fi

if [ "$(id -u)" = 0 ] && [ "$run_as" != root ]; then
    # Secrets are bind mounts owned by whoever generated them: copy them for run_as.
    if [ -d /run/secrets ]; then
        install -d -m 0700 -o "$run_as" -g "$run_as" /run/fleet-secrets
        for secret in /run/secrets/*; do
            if [ -f "$secret" ]; then
                install -m 0400 -o "$run_as" -g "$run_as" "$secret" /run/fleet-secrets/
            fi
        done
    fi
    # Named volumes start out owned by root.
    for dir in /var/lib/fleet /var/lib/fleet-hub; do
        if [ -d "$dir" ]; then
            chown -R "$run_as:$run_as" "$dir"
        fi
    done
    # setpriv keeps HOME=/root, which run_as cannot read (config discovery stats ~/.config).
    HOME=$(getent passwd "$run_as" | cut -d: -f6)
    export HOME
    exec setpriv --reuid "$run_as" --regid "$run_as" --init-groups --no-new-privs fleet "$@"
fi
exec fleet "$@"
