"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dandelion_p2p.netlab import NetLab, netlab_unavailable_reason


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """A fresh network lab, torn down after the test; skips where namespaces cannot be built."""
    reason = netlab_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network lab unavailable: {reason}")
    with NetLab() as lab:
        yield lab
