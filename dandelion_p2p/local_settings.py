"""This machine's own settings for training, kept in ``data_dir/local_settings.json``.

They are what a volunteer decides about their own hardware (which device, how much memory to
spend, whether to share telemetry), as opposed to the run config, which the run owner
publishes for everyone. The worker reads them when it starts; the web UI edits them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dandelion_p2p.errors import ConfigError

FILE_NAME = "local_settings.json"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "no", "fp16", "bf16")
ATTENTIONS = ("sdpa", "xformers")


@dataclass(frozen=True, slots=True)
class LocalSettings:
    device: str = "auto"
    """auto picks CUDA when available."""
    micro_batch: int = 0
    """Samples per forward pass; 0 lets the run config decide."""
    mixed_precision: str = "auto"
    attention: str = "sdpa"
    gradient_checkpointing: bool = True
    eight_bit_adam: bool = True
    share_telemetry: bool = False
    """Publish this peer's loss and throughput for the run's global charts."""
    follow_symlinks: bool = False
    """Train also on files that symlinks in the local data folder lead to outside it."""
    devices: int = 1
    """Devices this peer trains on together (data parallel inside the peer, 1-64); more
    than one needs a local data folder."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: dict[str, Any]) -> LocalSettings:
        """A copy with ``changes`` applied; raises ``ConfigError`` naming each bad key."""
        if not isinstance(changes, dict):
            raise ConfigError("settings must be an object")
        known = {f.name for f in fields(self)}
        unknown = sorted(k for k in changes if k not in known)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(map(str, unknown))}")
        return LocalSettings(**{**self.to_dict(), **changes})


def _problems(s: LocalSettings) -> list[str]:
    out: list[str] = []
    for name, allowed in (
        ("device", DEVICES),
        ("mixed_precision", PRECISIONS),
        ("attention", ATTENTIONS),
    ):
        if getattr(s, name) not in allowed:
            out.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(s, name)!r}")
    if isinstance(s.micro_batch, bool) or not isinstance(s.micro_batch, int) or not (
        0 <= s.micro_batch <= 4096
    ):
        out.append(f"micro_batch must be an integer 0-4096, got {s.micro_batch!r}")
    if isinstance(s.devices, bool) or not isinstance(s.devices, int) or not 1 <= s.devices <= 64:
        out.append(f"devices must be an integer 1-64, got {s.devices!r}")
    for name in ("gradient_checkpointing", "eight_bit_adam", "share_telemetry",
                 "follow_symlinks"):
        if not isinstance(getattr(s, name), bool):
            out.append(f"{name} must be true or false, got {getattr(s, name)!r}")
    return out


def settings_path(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def load_local_settings(data_dir: Path) -> LocalSettings:
    """The saved settings, or the defaults when none were saved.

    Raises ``ConfigError`` for an unreadable or invalid file (never silently replaced: the
    user's choices are theirs to fix).
    """
    path = settings_path(data_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return LocalSettings()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read local settings: {exc}") from None
    try:
        return LocalSettings().updated(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_local_settings(data_dir: Path, settings: LocalSettings) -> None:
    """Write atomically: a crash leaves either the old file or the new one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = settings_path(data_dir)
    fd, tmp = tempfile.mkstemp(prefix=".local_settings.", dir=data_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(settings.to_dict(), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
