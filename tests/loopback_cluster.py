"""A real two-node Ray cluster on loopback, started with `ray start` the way an operator would.

Each node is its own `ray start --block` process, so one node can be killed (its process group, at once)
without `ray stop`, which would take down every Ray on the machine,
including the test session's own local cluster.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    def __init__(self, workdir: Path, head_cpus: int, worker_cpus: int):
        self.workdir = workdir
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        self.env.pop("RAY_ADDRESS", None)
        self.head: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def _ray(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / "ray"), *args]

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        # Every agent port is a free one: the defaults (52365 for the job agent) collide with any other
        # Ray on this machine, e.g. a test session's local cluster, and then no job can be submitted.
        agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                       f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(self._ray("start", "--block", "--node-ip-address=127.0.0.1",
                                              "--object-store-memory=300000000", "--disable-usage-stats",
                                              *agent_ports, *args),
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout_s: float = 120) -> None:
        self.head = self._spawn("head", "--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
                                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                                f"--temp-dir={self.temp_dir}")
        self._wait_nodes(1, timeout_s)
        self.worker = self._spawn("worker", f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={self.worker_cpus}")
        self._wait_nodes(2, timeout_s)

    def cli(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS`. A job submission is retried (bounded) while the head's job agent is still starting:
        it answers "No available agent to submit job" for a while after the nodes are alive."""
        deadline = time.time() + 120
        while True:
            out = subprocess.run(self._ray(*args), env=self.env, cwd=cwd, capture_output=True, text=True,
                                 check=False, timeout=120)
            if out.returncode and "No available agent" in out.stderr and time.time() < deadline:
                time.sleep(3)
                continue
            if check:
                out.check_returncode()
            return out

    def _state(self, kind: str, *args: str) -> list[dict]:
        """`ray list KIND` as records; [] while the dashboard is not up (or says "No resource")."""
        out = self.cli("list", kind, "--address", self.address, "--format", "json", "--limit", "1000", *args,
                       check=False)
        text = out.stdout.strip()
        return json.loads(text) if out.returncode == 0 and text.startswith("[") else []

    def nodes(self) -> list[dict]:
        return self._state("nodes")

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for proc in (self.head, self.worker):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"a Ray node exited with {proc.returncode}; see {self.workdir}/*.log")
            if sum(x["state"] == "ALIVE" for x in self.nodes()) >= n:
                return
            time.sleep(2)
        raise TimeoutError(f"{n} Ray node(s) not alive after {timeout_s:.0f} s")

    def worker_node_id(self) -> str:
        return next(x["node_id"] for x in self.nodes() if not x["is_head_node"] and x["state"] == "ALIVE")

    def actors_on(self, node_id: str) -> list[str]:
        return [a["class_name"] for a in self._state("actors", "--filter", "state=ALIVE") if a["node_id"] == node_id]

    def job_status(self, job_id: str) -> str:
        """The job API's own status field (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        req = urllib.request.Request(f"{self.address}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["status"]

    def kill_worker(self) -> None:
        """Take the second node down the way a crash or a spot reclaim without notice does: SIGKILL to its
        whole process group (`ray start`, raylet, agents, every worker) at once.

        Not SIGTERM: a graceful stop drains for ~30 s here, and a job can finish inside that window,
        which left the test proving nothing (and failing) on a faster machine."""
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(10)

    def wait_dead(self, node_id: str, timeout_s: float = 120) -> float:
        """Seconds until the head reports the node DEAD (its health checks run out, ~15 s by default)."""
        start = time.time()
        while time.time() < start + timeout_s:
            if [x["state"] for x in self.nodes() if x["node_id"] == node_id] == ["DEAD"]:
                return time.time() - start
            time.sleep(1)
        raise TimeoutError(f"node {node_id} not reported DEAD after {timeout_s:.0f} s")

    def shutdown(self) -> None:
        for proc in (self.worker, self.head):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's session dir; node logs stay in workdir
