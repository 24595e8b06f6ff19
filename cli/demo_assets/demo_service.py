#!/usr/bin/env python3
"""The demo node's service: a tiny HTTP server that answers with its installed version.

It reads ``$FLEET_STATE_DIR/app/version.json`` ({"version": ..., "requires_hw": ...}) and
``$DEMO_PORT``. A version that requires another hardware revision than ``$DEMO_HW``
refuses to start, the way a driver built for the wrong board revision would.
"""

import http.server
import json
import os
import sys
from pathlib import Path

state = Path(os.environ.get("FLEET_STATE_DIR", "."))
info = json.loads((state / "app" / "version.json").read_text())
hw = os.environ.get("DEMO_HW", "rev-b")
needed = info.get("requires_hw")
if needed and needed != hw:
    sys.stderr.write(f"demo-app {info['version']}: unsupported hardware revision {hw} (needs {needed})\n")
    sys.exit(3)


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the installed version."""

    def do_GET(self) -> None:
        """Serve the version as JSON."""
        body = json.dumps({"service": "demo-app", "version": info["version"], "hw": hw}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet."""


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["DEMO_PORT"])), Handler)
print(f"demo-app {info['version']} listening on 127.0.0.1:{server.server_port}", flush=True)
server.serve_forever()
