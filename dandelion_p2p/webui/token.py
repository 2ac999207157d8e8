"""The web UI's access token: random, created once, kept in the data directory (mode 0600)."""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from dandelion_p2p.errors import ConfigError

TOKEN_FILE = "webui.token"
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{32,128}")


def token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_FILE


def load_or_create_token(data_dir: Path) -> str:
    """The saved token, or a new one written with mode 0600 when none exists.

    A token file readable by other users is tightened to 0600 (the token grants full control
    of the node). Raises ``ConfigError`` when the file cannot be read or written, or holds
    something that is not a token (never silently replaced: someone may rely on it).
    """
    path = token_path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot create web UI token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write web UI token file {path}: {exc.strerror}") from None
    return token


def _read_token(path: Path) -> str:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read web UI token file {path}: {exc.strerror}") from None
    if not _TOKEN.fullmatch(token):
        raise ConfigError(
            f"{path} does not hold a web UI token (32-128 URL-safe characters); "
            "delete it to have a new one created"
        )
    return token
