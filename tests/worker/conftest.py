"""Tiny models and images shared by the worker and sync tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dandelion_p2p.worker.tiny import build_tiny_pipeline, write_images


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), "sd1")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 8)
    return folder
