"""A real ``mlflow server`` for tests: sqlite store, proxied artifacts, a free port.

The server runs in its own process group (``start_new_session=True``) so that
:meth:`MlflowServer.stop` ends exactly the processes it started (uvicorn and its
workers) with ``os.killpg`` on that group, and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with its database and artifacts under ``root``;
    :meth:`start` again after :meth:`stop` brings it back on the same port and data."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._pgid: int | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        if self.running:
            return
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        env = dict(
            os.environ,
            MLFLOW_DISABLE_TELEMETRY="true",
            # The server's background job runner starts a dozen more processes: not needed here.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child process keeps it open
        try:
            self._process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self._pgid = os.getpgid(self._process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL if the server still
        holds its port after a while. Returns once the port is closed."""
        if self._process is None or self._pgid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._pgid, sig)
            except ProcessLookupError:  # the whole group is gone already
                break
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline and (self._process.poll() is None or self._port_open()):
                time.sleep(0.1)
            if self._process.poll() is not None and not self._port_open():
                break
        self._process = None
        self._pgid = None

    def freeze(self) -> None:
        """SIGSTOP the server's process group: the port stays open, nothing answers."""
        assert self._pgid is not None
        os.killpg(self._pgid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._pgid is not None
        os.killpg(self._pgid, signal.SIGCONT)

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def log_tail(self, chars: int = 4000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""
