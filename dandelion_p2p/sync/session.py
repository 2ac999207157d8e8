"""The worker the daemon talks to now: its session, its pid and the buffer it shares.

A worker says hello and gets a session token; every later call names it, so a worker that
was replaced (restarted, or a second one started by hand) is refused. The shared buffer
(``worker.shm``) lives as long as the session: a new hello, a new buffer request or the
worker's exit removes the old one.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.worker.shm import SharedVector


class WorkerSession:
    def __init__(self, buffer_dir: Path) -> None:
        self.buffer_dir = buffer_dir
        self.token: str | None = None
        self.pid: int | None = None
        """The worker's process id: the supervisor's worker, or one started by hand."""
        self.buffer: SharedVector | None = None

    def open(self) -> str:
        """A new session (the previous one's buffer is removed); returns its token."""
        self.drop_buffer()
        self.token = secrets.token_hex(16)
        return self.token

    def check(self, params: dict[str, Any]) -> None:
        """Raises: ConfigError: ``params`` name no session, or another than the current."""
        if params.get("session") != self.token or self.token is None:
            raise ConfigError("unknown worker session: another worker took over, say hello")

    def new_buffer(self, elements: int) -> SharedVector:
        """A fresh shared vector of ``elements`` float32, replacing the session's last one."""
        self.drop_buffer()
        self.buffer = SharedVector.create_in(self.buffer_dir, elements)
        return self.buffer

    def drop_buffer(self) -> None:
        if self.buffer is not None:
            self.buffer.unlink()
            self.buffer = None

    def end(self) -> None:
        """The worker is gone: its session and buffer with it."""
        self.pid = None
        self.token = None
        self.drop_buffer()
