#!/bin/sh
# Undo of install_update.sh (FLEET_PHASE=rollback).
set -eu
echo "rolling back update $* on $FLEET_NODE (phase $FLEET_PHASE)"
rm -f "$FLEET_STATE_DIR/updates/last"
