#!/bin/sh
# Health check of the demo service: it answers on its port with the expected version.
# Usage: check_app.sh [VERSION]   (port from $FLEET_STATE_DIR/app/port)
port=$(cat "$FLEET_STATE_DIR/app/port")
exec python3 - "$port" "${1:-}" <<'PY'
import json, sys, urllib.request
port, want = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
        got = json.load(r)["version"]
except OSError as exc:
    sys.exit(f"demo-app not answering on port {port}: {exc}")
print(f"demo-app answers version {got}")
if want and got != want:
    sys.exit(f"expected version {want}, got {got}")
PY
