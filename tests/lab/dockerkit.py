"""A real dockerd and Debian's docker-registry in the lab's network namespace.

dockerd runs with its own socket, exec root and pid file, ``--iptables=false --bridge=none``
(no NAT, no docker0; containers use ``--network host``, the lab's namespace). Its data root is
cached next to the Debian root (``$FLEET_LAB_CACHE/docker-1``), so the base image imported
from that root (``local/debian:bookworm``, ~5 s) and built images survive between runs.
Nothing is pulled from a public registry: the registry is ``127.0.0.1:PORT`` in the lab.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.lab import lab

BASE_IMAGE = "local/debian:bookworm"
DATA_VERSION = "docker-1"
REGISTRY_PORT = 5000

#: The web app of the container tests: serves its version (image) and MODE (configuration).
WEB_PY = """\
import http.server, json, os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 of its container: no default handler
body = json.dumps({"version": os.environ.get("WEB_VERSION"), "mode": os.environ.get("MODE")}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8090"))), Handler).serve_forever()
"""


class Docker:
    """dockerd + docker-registry, both in ``net``; ``docker(...)`` runs the CLI against it."""

    def __init__(self, net: lab.LabNet, root: Path, rootfs: Path) -> None:
        self.net = net
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.sock = root / "docker.sock"
        self.env = {
            "DOCKER_HOST": f"unix://{self.sock}",
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        }
        data = lab.CACHE / DATA_VERSION
        data.mkdir(parents=True, exist_ok=True)
        # In a mount namespace of its own: dockerd bind-mounts its data root and its exec root's
        # netns files, which would otherwise stay in this machine's mount table after it exits.
        self.daemon = net.spawn("dockerd", [
            "unshare", "-m", "--propagation", "private",
            "dockerd", "--host", f"unix://{self.sock}", "--data-root", str(data),
            "--exec-root", str(root / "x"), "--pidfile", str(root / "docker.pid"),
            "--iptables=false", "--ip-masq=false", "--bridge=none",
        ])  # fmt: skip
        lab.wait_for(
            "dockerd", lambda: self.docker("version", check=False).returncode == 0, timeout=60, interval=0.3
        )
        # Containers of an earlier, interrupted run.
        leftovers = self.docker("ps", "-aq").stdout.split()
        if leftovers:
            self.docker("rm", "-f", *leftovers)
        if self.docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
                subprocess.run(
                    ["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=self.env, check=True,
                    capture_output=True, timeout=300,
                )  # fmt: skip
        registry_dir = root / "registry"
        registry_dir.mkdir(exist_ok=True)
        (root / "registry.yml").write_text(
            "version: 0.1\n"
            "storage:\n  filesystem:\n    rootdirectory: " + str(registry_dir) + "\n"
            f"http:\n  addr: 127.0.0.1:{REGISTRY_PORT}\n"
        )
        self.registry = net.spawn(
            "registry",
            [shutil.which("docker-registry") or "docker-registry", "serve", str(root / "registry.yml")],
        )
        net.wait_port("127.0.0.1", REGISTRY_PORT)

    @property
    def registry_host(self) -> str:
        return f"127.0.0.1:{REGISTRY_PORT}"

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return lab._run(["docker", *args], env=self.env, check=check, timeout=timeout)

    def build(self, tag: str, context: Path, *args: str) -> None:
        self.docker("build", "-q", "--network", "none", "-t", tag, *args, str(context), timeout=600)

    def web_image(self, tag: str, version: str) -> None:
        """An image of the web app whose WEB_VERSION is ``version``, built from the local base."""
        context = self.root / f"web-{version}"
        context.mkdir(exist_ok=True)
        (context / "web.py").write_text(WEB_PY)
        (context / "Dockerfile").write_text(
            f"FROM {BASE_IMAGE}\nCOPY web.py /web.py\nENV WEB_VERSION={version} MODE=image-default\n"
            'CMD ["python3", "/web.py"]\n'
        )
        self.build(tag, context)

    def close(self) -> None:
        leftovers = self.docker("ps", "-aq", check=False).stdout.split()
        if leftovers:
            self.docker("rm", "-f", *leftovers, check=False)
        self.docker("image", "prune", "-f", check=False)  # rebuilt images leave their old layers
        self.net.stop(self.registry)
        self.net.stop(self.daemon, timeout=30)
