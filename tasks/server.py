"""Prefect's temporary server, started at the very beginning of a command instead of at its first API call.

Without ``PREFECT_API_URL`` Prefect starts a temporary local server the first time a flow talks to its API
(``prefect.server.api.server.SubprocessASGIServer``: uvicorn on Prefect's app factory, UI off) and the caller
waits the ~6 s that server takes to boot. :func:`start` launches the same server process (same command, same
environment switches, same database) before anything else is imported, so it boots on one core while this
process imports and loads on the other; :meth:`Temporary.ready` waits for its health check when the flow is
about to start. Imports no Prefect at module level: starting it must not wait for Prefect's import.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pruneflow.errors import PruneflowError
from pruneflow.infra.stack import free_port

# what SubprocessASGIServer sets for its child (prefect 3.9): no UI, ephemeral-server mode
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


class Temporary:
    """A temporary Prefect server process on a free 127.0.0.1 port; stopped by :meth:`stop`."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise PruneflowError("prefect is not installed (`pip install pruneflow` installs it)")
        self._app_dir = str(Path(spec.origin).parent.parent)
        self._spawn()

    def _spawn(self) -> None:
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **SERVER_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL)

    def ready(self, timeout: float = 60) -> str:
        """Wait until the server answers /health; returns its API URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:  # the port was taken between choosing and binding it
                self._spawn()
                continue
            if code is not None:
                tail = self.process.stderr.read().decode(errors="replace")[-1500:] if self.process.stderr else ""
                raise PruneflowError(f"Prefect's temporary server exited with {code} while starting: {tail}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2):
                    return self.api_url
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise PruneflowError(f"Prefect's temporary server did not answer within {timeout:.0f} s; start one with "
                             f"`pruneflow up` (or `prefect server start`) and set PREFECT_API_URL")

    def wanted(self) -> bool:
        """Once Prefect is imported: is a temporary server what Prefect would use? Not when a profile or
        settings file names an API URL (then that server is used) or ephemeral mode is off (Prefect says so).
        If not wanted, the process is stopped."""
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            self.stop()
            return False
        return True

    def stop(self) -> None:
        """Send what Prefect still queues for the API (run logs, events), then stop the server: logs queued
        for a server that is gone are retried at exit for over a minute ("Error logging to API")."""
        if self.process.poll() is None and "prefect" in sys.modules:
            _drain_prefect()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def _drain_prefect(timeout: float = 10) -> None:
    """Flush Prefect's API log worker and events worker (as Prefect's own test harness does before it stops
    its server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.drain_all(timeout=timeout)
        EventsWorker.drain_all(timeout=timeout)
    except RuntimeError:  # a worker that never started
        pass


def start() -> Temporary | None:
    """A temporary server when the environment names no PREFECT_API_URL (a profile still may: see
    :meth:`Temporary.wanted`), else None."""
    return None if os.environ.get("PREFECT_API_URL") else Temporary()
