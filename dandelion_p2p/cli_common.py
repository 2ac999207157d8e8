"""What every ``dandelion-p2p`` subcommand shares: option lists, failing with a message, and
calling the running daemon over its control socket.

The main command (``cli``) and the subcommands that live beside their feature
(``runconfig.cli``, ``dataset.cli``, ``worker.cli``) import this module; it imports none of
them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from dandelion_p2p.config import DaemonConfig, load_config
from dandelion_p2p.control.client import call_sync
from dandelion_p2p.errors import DandelionError

Options = list[tuple[tuple[str, ...], dict[str, Any]]]

CONTROL_OPTIONS: Options = [
    (("--data-dir",), {"type": click.Path(path_type=Path), "help": "The daemon's data dir."}),
    (("--config", "config_file"), {"type": click.Path(path_type=Path), "help": "TOML file."}),
]
"""How a command finds the daemon it talks to (``call_daemon``'s first two arguments)."""

CALL_TIMEOUT = 30.0
"""Seconds a command waits for the daemon's answer."""


def add_options(options: Options) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding ``options`` to a click command, in list order."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for names, kwargs in reversed(options):
            func = click.option(*names, **kwargs)(func)
        return func

    return decorate


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def resolve_data_dir(data_dir: Path | None, config_file: Path | None) -> Path:
    """The data dir as the daemon resolves it: flag, then DANDELION_DATA_DIR, then the file."""
    cli_values = {"data_dir": data_dir} if data_dir is not None else {}
    return load_config("daemon", cli_values, config_file=config_file).data_dir


def call_daemon(
    data_dir: Path | None, config_file: Path | None, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Run ``method`` in the daemon of ``data_dir`` and return its result; on any failure
    (no daemon, the method failed) print the reason and exit with status 2."""
    try:
        path = DaemonConfig(data_dir=resolve_data_dir(data_dir, config_file)).control_socket_path
        return call_sync(path, method, params, timeout=CALL_TIMEOUT)
    except DandelionError as exc:
        fail(str(exc))
