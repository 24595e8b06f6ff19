"""CPU per job of one real agent running the 5-step update, beside the bare work of those steps.

    python bench/agent_cpu.py --jobs 20 [--profile DIR]

Starts mosquitto, a hub and one real ``fleet agent`` (process service manager,
one service ``app``: a small HTTP server that answers ``ok <size of its
installed file>``), and a local HTTP server holding one 1 MiB artifact per job.
Each job is the update of DESIGN section 2 that Ansible was compared with
(FINDINGS.md): download the 1 MiB artifact with its sha256, stop the service,
install the artifact (``file`` step), start the service, HTTP health check.
Jobs run one after another (one rollout each); the figures are per job:

- ``agent_own_cpu_s``: the agent process itself (all its threads);
- ``agent_children_cpu_s``: the children it started and reaped (helpers,
  launchers; the service is detached and not counted, in both columns);
- ``bare_cpu_s``: the same five steps done by a plain ``sh`` script with
  ``curl``, ``sha256sum``, ``kill``, ``cp``/``mv``, ``setsid`` and ``curl``
  (all its processes, via RUSAGE_CHILDREN);
- ``steps``: the agent's CPU (own + children) split at its own step reports,
  sampled from /proc when each report arrives (10 ms ticks, averaged over the jobs).

``--profile DIR`` runs the agent under cProfile timed by CPU (DIR/agent.prof).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from _common import CLK_TCK, Bench, Observer, child_env, emit, spawn

from cli.ports import free_port

STEPS = ("download", "stop", "install", "start", "health")
ARTIFACT_BYTES = 1024 * 1024

# The service being updated: answers "ok <size of app.bin>" on its port.
SERVICE = r"""
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("ok %d" % os.path.getsize("app/app.bin")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

#: The bare work of each step, as a plain script would do it (one ``sh`` per step).
BARE = {
    "download": 'curl -sf -o "cache/$NAME.part" "$URL"'
    ' && echo "$SHA  cache/$NAME.part" | sha256sum -c --status && mv "cache/$NAME.part" "cache/$NAME"',
    "stop": 'if [ -f app.pid ]; then kill "$(cat app.pid)" 2>/dev/null || true; rm app.pid; fi',
    "install": 'cp "cache/$NAME" app/.app.bin.new && mv app/.app.bin.new app/app.bin',
    # the agent's start waits its settle time (0.5 s) and checks the service still runs: so does this
    "start": 'setsid "$PYTHON" -c "$SERVICE" "$PORT" >>app.log 2>&1 </dev/null & echo $! > app.pid;'
    ' sleep 0.5; kill -0 "$(cat app.pid)"',
    "health": 'i=0; until curl -sf "http://127.0.0.1:$PORT/" | grep -q ok; do'
    " i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.05; done",
}


class Artifacts(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        body = self.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def plan(url: str, sha: str, name: str, port: int) -> list[dict[str, Any]]:
    return [
        {"type": "download", "url": url, "sha256": sha, "name": name},
        {"type": "service", "action": "stop", "name": "app"},
        {"type": "file", "src": name, "dest": "app/app.bin", "mode": "0644"},
        {"type": "service", "action": "start", "name": "app"},
        {
            "type": "health",
            "check": "http",
            "target": f"http://127.0.0.1:{port}/",
            "expect": "ok",
            "retries": 100,
            "interval_s": 0.05,
        },
    ]


async def run_agent_jobs(
    bench: Bench, agent_pid: int, node: str, http_port: int, jobs: int, port: int
) -> dict[str, Any]:
    names = [f"app-{k}.bin" for k in range(jobs + 1)]
    for name in names:
        Artifacts.files[name] = os.urandom(ARTIFACT_BYTES)
    per_step = [0.0] * len(STEPS)
    own = children = 0.0
    walls = []
    async with Observer(bench.url, bench.topics) as obs:
        await obs.wait_online(1, 60, prefix=node)
        for k, name in enumerate(names):
            body = Artifacts.files[name]
            steps = plan(f"http://127.0.0.1:{http_port}/{name}", hashlib.sha256(body).hexdigest(), name, port)
            if os.environ.get("AGENT_CPU_PLAN") == "tcp":  # the fixed cost of a job: one TCP check
                steps = [{"type": "health", "check": "tcp", "target": f"127.0.0.1:{http_port}"}]
            seen = len(obs.statuses)
            marks: list[tuple[int, str, float]] = []
            before = proc_cpu(agent_pid)
            started = time.perf_counter()
            reply = await obs.call("create_rollout", {"name": f"job {k}", "targets": [node], "plan": steps})
            rollout = reply["rollout"]

            def progress(rollout: str = rollout, seen: int = seen, marks: list[Any] = marks) -> Any:
                for _at, status in obs.statuses[seen + len(marks) :]:
                    if status.rollout == rollout:
                        marks.append((status.index, status.state, sum(proc_cpu(agent_pid))))
                    else:
                        marks.append((-1, "", 0.0))
                return obs.final(rollout)

            final = await obs.until(progress, "final state", 120)
            if final[1] != "succeeded":
                raise RuntimeError(f"job {k} ended {final[1]}: see the agent's log")
            after = proc_cpu(agent_pid)
            if k == 0:
                continue  # the first job warms the caches (imports, step modules, the service's first start)
            walls.append(time.perf_counter() - started)
            own += after[0] - before[0]
            children += after[1] - before[1]
            start_of: dict[int, float] = {}
            for index, state, cpu in marks:
                if index < 0:
                    continue
                if state == "running":
                    start_of[index] = cpu
                elif state == "succeeded" and index in start_of:
                    per_step[index] += cpu - start_of[index]
    return {
        "agent_own_cpu_s": round(own / jobs, 4),
        "agent_children_cpu_s": round(children / jobs, 4),
        "agent_cpu_s": round((own + children) / jobs, 4),
        "agent_wall_s": round(sum(walls) / len(walls), 3),
        "steps": {step: round(per_step[i] / jobs, 4) for i, step in enumerate(STEPS)},
    }


def run_bare(root: Path, http_port: int, jobs: int, port: int) -> dict[str, Any]:
    """The five steps by plain tools, one ``sh -c`` each, CPU of all their processes (RUSAGE_CHILDREN)."""
    state = root / "bare"
    (state / "cache").mkdir(parents=True)
    (state / "app").mkdir()
    env = {"PATH": os.environ["PATH"], "PORT": str(port), "PYTHON": sys.executable, "SERVICE": SERVICE}
    per_step = dict.fromkeys(BARE, 0.0)
    wall = 0.0
    names = [f"app-{k}.bin" for k in range(jobs + 1)]
    try:
        for k, name in enumerate(names):
            job_env = env | {"URL": f"http://127.0.0.1:{http_port}/{name}", "NAME": name}
            job_env["SHA"] = hashlib.sha256(Artifacts.files[name]).hexdigest()
            started = time.perf_counter()
            for step, script in BARE.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(["sh", "-c", script], env=job_env, cwd=state, check=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if k:  # the first job warms the caches, as for the agent
                    per_step[step] += (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            if k:
                wall += time.perf_counter() - started
    finally:
        pidfile = state / "app.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), 15)
    return {
        "bare_cpu_s": round(sum(per_step.values()) / jobs, 4),
        "bare_wall_s": round(wall / jobs, 3),
        "bare_steps": {step: round(cpu / jobs, 4) for step, cpu in per_step.items()},
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--profile", type=Path, help="run the agent under cProfile, write DIR/agent.prof")
    args = parser.parse_args()
    if not 1 <= args.jobs <= 1000:
        parser.error("--jobs must be between 1 and 1000")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Artifacts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http_port = server.server_address[1]
    node = "cpu-1"
    try:
        with Bench("mosquitto", keep=args.keep) as bench:
            bench.start_hub()
            state = bench.workdir / f"state-{node}"
            (state / "app").mkdir(parents=True)
            (state / "app" / "app.bin").write_bytes(b"old")
            services = {"app": {"command": [sys.executable, "-c", SERVICE, "PORT"]}}
            profiler = ["-m"]
            if args.profile:
                profiler = [
                    str(Path(__file__).with_name("_cpuprofile.py")),
                    str(args.profile.resolve() / "agent.prof"),
                ]
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            service_port = free_port()
            services["app"]["command"][-1] = str(service_port)
            env = child_env(FLEET_SERVICES=json.dumps(services))
            agent = spawn(
                "agent",
                [
                    sys.executable,
                    *profiler,
                    "cli.main",
                    "agent",
                    "--broker",
                    bench.url,
                    "--prefix",
                    bench.prefix,
                    "--node-id",
                    node,
                    "--state-dir",
                    str(state),
                    "--trust",
                    str(bench.pub),
                ],
                bench.workdir,
                env,
            )
            bench.children.append(agent)
            figures = asyncio.run(run_agent_jobs(bench, agent.pid, node, http_port, args.jobs, service_port))
            bare = run_bare(bench.workdir, http_port, args.jobs, free_port())
    finally:
        server.shutdown()
    ratio = figures["agent_cpu_s"] / bare["bare_cpu_s"] if bare["bare_cpu_s"] else None
    emit(
        {
            "bench": "agent_cpu",
            "broker": "mosquitto",
            "nodes": 1,
            "seconds": figures["agent_wall_s"],
            "jobs": args.jobs,
            **figures,
            **bare,
            "ratio_agent_to_bare": round(ratio, 2) if ratio else None,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
