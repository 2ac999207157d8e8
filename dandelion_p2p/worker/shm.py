"""The shared buffer: one flat float32 vector that the worker and the daemon both map.

It is a file, in ``/dev/shm`` where that exists (memory, never written back to a disk) and in
the data directory otherwise, opened with mode 0600 and mapped with ``mmap``. The daemon
creates it for the size the worker asks for and removes it when the worker is gone; the
worker maps the same file. No bytes of the vector ever cross the control socket.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")


def buffer_dir(data_dir: Path) -> Path:
    if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK):
        return SHM_DIR
    return data_dir


PREFIX = "dandelion-worker-"


def remove_stale(directory: Path) -> list[Path]:
    """Remove buffers left by daemons that died without cleaning up (their pid is gone);
    a buffer can hold gigabytes of memory in ``/dev/shm``. Only our own files are touched."""
    removed = []
    for path in directory.glob(f"{PREFIX}*.f32"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
            if path.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except (ValueError, OSError):
            continue
    return removed


class SharedVector:
    """A mapped file of ``elements`` float32 values; ``array`` is a numpy view of it."""

    def __init__(self, path: Path, elements: int, *, create: bool) -> None:
        if elements < 1:
            raise ValueError("a shared vector needs at least one element")
        self.path = Path(path)
        self.elements = elements
        size = elements * 4
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(
                    f"{self.path} holds {os.fstat(fd).st_size} bytes, expected {size}"
                )
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array: np.ndarray = np.frombuffer(self._map, dtype=np.float32)

    @classmethod
    def create_in(cls, directory: Path, elements: int) -> SharedVector:
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}.f32"
        return cls(directory / name, elements, create=True)

    def close(self) -> None:
        # Views of the map must be gone before it can close; the caller drops its own.
        self.array = np.empty(0, dtype=np.float32)
        # A view still alive somewhere keeps the map open; it closes with the view.
        with contextlib.suppress(BufferError):
            self._map.close()

    def unlink(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
