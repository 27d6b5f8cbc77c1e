"""A real Ray head node on loopback for job-submission tests, started with `ray start --head` and stopped by
killing exactly its processes (never `ray stop`, which would kill every Ray on the machine)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_of(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) from /proc, or None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3])


class LoopbackHead:
    """`ray start --head` in its own session: every daemon it starts shares that session id, workers keep it,
    and job drivers are their descendants, so stop() finds them all without touching other Rays."""

    def __init__(self, auth_mode: str = "token", num_cpus: int = 2, extra_env: dict | None = None, attempts: int = 3):
        self.token = secrets.token_hex(32) if auth_mode == "token" else ""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            RAY_AUTH_MODE=auth_mode,
            RAY_AUTH_TOKEN=self.token,
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            RAY_TRAIN_V2_ENABLED="1",
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",  # `python` = this venv
            **(extra_env or {}),
        )
        if not self.token:
            env.pop("RAY_AUTH_TOKEN")
        self.env = env
        # Ray gives a raylet a fixed 30 s to register; on a machine busy with other work that can pass: start again.
        for _attempt in range(attempts):
            out = self._start(num_cpus)
            if self.starter.returncode == 0:
                return
            self.stop()
            time.sleep(10)
        raise RuntimeError(f"ray start --head failed {attempts} times; last output:\n{out[-3000:]}")

    def _start(self, num_cpus: int) -> str:
        gcs, self.dashboard_port, agent, agent_grpc, self.metrics_port, runtime_env, client = free_ports(7)
        self.temp_dir = tempfile.mkdtemp(prefix="cfhead", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        cmd = [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--ray-client-server-port={client}",
            f"--num-cpus={num_cpus}",
            "--object-store-memory=300000000",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        self.starter = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        return self.starter.communicate(timeout=180)[0]

    def cli(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """A Ray CLI call against this head, with its auth settings (or ``env`` to override them)."""
        e = dict(self.env, RAY_ADDRESS=self.address, **(env or {}))
        return subprocess.run([RAY, *args], env=e, capture_output=True, text=True, timeout=timeout)

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str,
        submission_id: str,
        timeout: float = 120,
        extra: tuple[str, ...] = (),
    ) -> None:
        """`ray job submit --no-wait`, retried while the job agent is still starting."""
        deadline = time.time() + timeout
        while True:
            r = self.cli(
                "job",
                "submit",
                "--no-wait",
                f"--submission-id={submission_id}",
                f"--working-dir={working_dir}",
                *extra,
                "--",
                *entrypoint,
            )
            if r.returncode == 0:
                return
            if time.time() > deadline or not re.search(
                r"No available agent|Connection refused|503|not ready", r.stdout + r.stderr
            ):
                raise RuntimeError(f"ray job submit failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            time.sleep(2)

    def wait(self, submission_id: str, timeout: float, metrics_prefix: str | None = None) -> tuple[str, str, dict]:
        """Follow the job's log until it ends; returns (final status, log, {metric: last value} of the series
        named ``metrics_prefix``* seen on the metrics export while the job ran: gauges vanish soon after their
        process exits, so they are sampled during the run)."""
        seen: dict[str, float] = {}
        done = threading.Event()

        def sample():
            while True:
                try:
                    for line in self.metrics().splitlines():
                        if metrics_prefix and line.startswith(metrics_prefix):
                            series, value = line.rsplit(" ", 1)
                            seen[series] = float(value)
                except OSError:
                    pass
                if done.wait(2):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            logs = self.cli("job", "logs", "--follow", submission_id, timeout=timeout).stdout
        finally:
            done.set()
            sampler.join()
        status = self.cli("job", "status", submission_id).stdout
        m = re.search(r"status: (\w+)|Job '.*' (succeeded|failed|stopped)", status)
        final = next((g for g in (m.groups() if m else ()) if g), "UNKNOWN").upper()
        return final, logs, seen

    def metrics(self) -> str:
        """The node's Prometheus export (application metrics from ray.util.metrics among Ray's own)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        sid = self.starter.pid  # start_new_session: the session id is the starter's pid
        procs = {int(p): _session_of(int(p)) for p in os.listdir("/proc") if p.isdigit()}
        procs = {p: s for p, s in procs.items() if s}
        kill = {p for p, (_, s) in procs.items() if s == sid}
        while True:  # job drivers run in their own sessions, below the head's workers
            more = {p for p, (pp, _) in procs.items() if pp in kill} - kill
            if not more:
                break
            kill |= more
        kill.discard(os.getpid())
        for p in kill:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
