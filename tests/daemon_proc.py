"""Run ``dandelion-p2p daemon`` / ``join`` as real processes (optionally inside a lab host)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dandelion_p2p.control.client import call_sync


class Launcher(Protocol):
    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]: ...


class LocalLauncher:
    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(args, **kwargs)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[Any]
    data_dir: Path
    stdout_path: Path
    stderr_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)

    @property
    def control_socket(self) -> Path:
        return self.data_dir / "control.sock"

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        return call_sync(self.control_socket, method, params, timeout=timeout)

    def logs(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.stdout_path.read_text().splitlines()
            if "ready" in lines:
                for line in lines:
                    if line.startswith("peer id: "):
                        self.peer_id = line.removeprefix("peer id: ")
                    elif line.startswith("address: "):
                        self.addrs.append(line.removeprefix("address: "))
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Signal the daemon and wait; returns (exit code, seconds it took)."""
        start = time.monotonic()
        self.send_signal(sig)
        code = self.wait_stopped(sig, timeout)
        return code, time.monotonic() - start

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless the daemon has exited (a second SIGTERM cuts its drain short)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_stopped(self, sig: int, timeout: float) -> int:
        """The exit code; a daemon still running after ``timeout`` is killed, and that fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon ignored {sig!r} for {timeout} s:\n{self.logs()}"
            ) from None


def launch_daemon(
    command: str,
    args: list[str],
    data_dir: Path,
    *,
    launcher: Launcher | None = None,
) -> DaemonProcess:
    """Start the process without waiting for it: ``wait_ready`` next (``start_daemons``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = data_dir / "stdout.log"
    stderr_path = data_dir / "stderr.log"
    # Many test daemons run at once: none takes the web UI's fixed port unless a test asks.
    webui = [] if any(a.startswith(("--webui", "--no-webui")) for a in args) else ["--no-webui"]
    argv = [sys.executable, "-m", "dandelion_p2p.cli", command, *args, *webui,
            "--data-dir", str(data_dir)]
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        proc = (launcher or LocalLauncher()).popen(argv, stdout=out, stderr=err)
    return DaemonProcess(proc, data_dir, stdout_path, stderr_path)


def start_daemons(
    launched: list[DaemonProcess], ready_timeout: float = 30.0
) -> list[DaemonProcess]:
    """Wait until every daemon of ``launched`` is ready; on failure all of them are killed."""
    try:
        for daemon in launched:
            daemon.wait_ready(ready_timeout)
    except BaseException:
        for daemon in launched:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()
        raise
    return launched


def start_daemon(
    command: str,
    args: list[str],
    data_dir: Path,
    *,
    launcher: Launcher | None = None,
    ready_timeout: float = 30.0,
) -> DaemonProcess:
    (daemon,) = start_daemons([launch_daemon(command, args, data_dir, launcher=launcher)],
                              ready_timeout)
    return daemon


class LabHost(Launcher, Protocol):
    """A netlab host: it launches processes and has an address (``netlab.Host``)."""

    ip: str


def start_lab_relay(
    host: LabHost, data_dir: Path, daemons: list[DaemonProcess], bootstrap: str | None = None
) -> tuple[DaemonProcess, str]:
    """A relay daemon on ``host`` (port 4001), kept in ``daemons``; with its full address."""
    args = ["--relay", "--listen", f"/ip4/{host.ip}/tcp/4001"]
    if bootstrap is not None:
        args += ["--bootstrap", bootstrap]
    relay = start_daemon("daemon", args, data_dir, launcher=host)
    daemons.append(relay)
    return relay, f"/ip4/{host.ip}/tcp/4001/p2p/{relay.peer_id}"
