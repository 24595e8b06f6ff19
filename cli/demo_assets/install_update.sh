#!/bin/sh
# Example update script: records what it did so rollback.sh can undo it.
set -eu
echo "installing update $* on $FLEET_NODE (rollout $FLEET_ROLLOUT)"
mkdir -p "$FLEET_STATE_DIR/updates"
echo "$*" > "$FLEET_STATE_DIR/updates/last"
