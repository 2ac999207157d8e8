"""Fixtures for tests that run daemons (and their workers) as separate processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.daemon_proc import DaemonProcess


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """A list the test appends its daemons to; all are stopped afterwards, last first, and
    together: each is signalled before any is waited for."""
    started: list[DaemonProcess] = []
    # Several daemons and workers share the test machine's cores: one thread each.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield started
    finally:
        for daemon in reversed(started):
            daemon.send_signal(signal.SIGTERM)
        failures = []
        for daemon in reversed(started):
            try:
                daemon.wait_stopped(signal.SIGTERM, 60)
            except AssertionError as failure:
                failures.append(failure)
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    if failures:
        raise failures[0]
