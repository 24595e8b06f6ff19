"""Wall time of a one-script rollout on N real `fleet agent` processes.

Starts a broker (the embedded one in its own process, or mosquitto), a hub and
N agent processes on 127.0.0.1, then times `fleet rollout create FILE --wait`
of a plan with one script step. Prints one JSON object.

    python bench/real_agents.py --nodes 50 [--broker amqtt|mosquitto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli.ports import free_port, wait_port

SCRIPT = '#!/bin/sh\necho "updating $FLEET_NODE to $1"\necho "$1" > "$FLEET_STATE_DIR/version"\n'
ROLLBACK = '#!/bin/sh\nrm -f "$FLEET_STATE_DIR/version"\n'


def fleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--broker", choices=["amqtt", "mosquitto"], default="amqtt")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    if not 1 <= args.nodes <= 300:
        parser.error("--nodes must be between 1 and 300")
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-agents-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env |= {"FLEET_NO_CONFIG_DISCOVERY": "1", "FLEET_PREFIX": "bench/v1"}
    procs: list[subprocess.Popen[bytes]] = []
    log = (root / "log.txt").open("ab")

    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        port = free_port()
        if args.broker == "amqtt":
            spawn(fleet("broker", "--port", str(port)))
        else:
            conf = root / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                "max_queued_messages 100000\nmax_inflight_messages 1000\npersistence false\n"
            )
            spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)])
        wait_port(port)
        url = f"mqtt://127.0.0.1:{port}"
        subprocess.run(
            fleet("keys", "generate", "--out", str(root / "keys")), check=True, capture_output=True, env=env
        )
        hub = spawn(
            fleet(
                "hub",
                "--broker",
                url,
                "--db",
                str(root / "hub.json"),
                "--signing-key",
                str(root / "keys" / "hub.key"),
            )
        )
        scripts = root / "scripts"
        scripts.mkdir()
        for name, text in (("install_update.sh", SCRIPT), ("rollback.sh", ROLLBACK)):
            (scripts / name).write_text(text)
            (scripts / name).chmod(0o755)
        nodes = [f"bench-{i:03d}" for i in range(args.nodes)]
        started = time.monotonic()
        agents = [
            spawn(
                fleet(
                    "agent",
                    "--broker",
                    url,
                    "--node-id",
                    node,
                    "--state-dir",
                    str(root / node),
                    "--scripts-dir",
                    str(scripts),
                    "--trust",
                    str(root / "keys" / "hub.pub"),
                    "--label",
                    "bench=yes",
                )
            )
            for node in nodes
        ]
        deadline = time.monotonic() + args.timeout
        online = 0
        while time.monotonic() < deadline:
            result = subprocess.run(
                fleet("nodes", "--broker", url, "--json"), capture_output=True, env=env, check=False
            )
            if result.returncode == 0:
                online = sum(1 for n in json.loads(result.stdout) if n["online"])
                if online == args.nodes:
                    break
            time.sleep(0.5)
        fleet_up_s = time.monotonic() - started
        spec = root / "rollout.json"
        spec.write_text(
            json.dumps(
                {
                    "name": "one script",
                    "targets": {"labels": {"bench": "yes"}},
                    "plan": [
                        {
                            "type": "script",
                            "name": "install_update.sh",
                            "args": ["2.0"],
                            "rollback": "rollback.sh",
                        }
                    ],
                }
            )
        )
        t0 = time.monotonic()
        result = subprocess.run(
            fleet("rollout", "--broker", url, "create", str(spec), "--wait", "--timeout", str(args.timeout)),
            capture_output=True,
            env=env,
            check=False,
            timeout=args.timeout + 30,
        )
        rollout_s = time.monotonic() - t0
        updated = sum(1 for node in nodes if (root / node / "version").exists())
        print(
            json.dumps(
                {
                    "bench": "real_agents",
                    "broker": args.broker,
                    "nodes": args.nodes,
                    "online": online,
                    "fleet_up_s": round(fleet_up_s, 2),
                    "rollout_s": round(rollout_s, 3),
                    "rollout_exit": result.returncode,
                    "nodes_updated": updated,
                    "hub_rss_mib": round(rss_mib(hub.pid), 1),
                    "agent_rss_mib": round(rss_mib(agents[0].pid), 1),
                }
            )
        )
        return 0 if result.returncode == 0 and updated == args.nodes else 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
