"""The access token file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.webui.token import load_or_create_token, token_path


def test_created_once_private_and_reused(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path / "data")
    path = token_path(tmp_path / "data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 32
    assert load_or_create_token(tmp_path / "data") == token


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    token_path(tmp_path).chmod(0o644)
    assert load_or_create_token(tmp_path) == token
    assert stat.S_IMODE(token_path(tmp_path).stat().st_mode) == 0o600


def test_garbage_in_the_file_is_an_error_not_replaced(tmp_path: Path) -> None:
    token_path(tmp_path).write_text("short\n")
    with pytest.raises(ConfigError, match="does not hold a web UI token"):
        load_or_create_token(tmp_path)
    assert token_path(tmp_path).read_text() == "short\n"
