"""Shared pytest fixtures."""

from __future__ import annotations

import signal
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from dandelion_p2p.netlab import NetLab, netlab_unavailable_reason
from dandelion_p2p.worker.tiny import build_tiny_pipeline, write_images
from tests.daemon_proc import DaemonProcess


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x pipeline folder, built once per session for every test using it."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), "sd1")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small captioned images."""
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 8)
    return folder


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """A list the test appends the daemons it starts to; those still running are killed
    afterwards (woken first, should the test have stopped one)."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """A fresh network lab, torn down after the test; skips where namespaces cannot be built."""
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network lab unavailable: {reason}")
    with NetLab() as lab:
        yield lab


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Show the innermost errors of a failure buried in nested trio exception groups."""
    report = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, BaseExceptionGroup):
        leaves = [
            "".join(traceback.format_exception(leaf)) for leaf in _leaves(call.excinfo.value)
        ]
        report.sections.append(("innermost errors", "\n".join(leaves[:5])))
    return report
