"""Daemon configuration: one frozen dataclass, validated, loaded from four layers.

Precedence, highest first (documented for users in ``docs/configuration.md``):

1. command-line flags (``--relay-max-circuits 32``; a value of ``None`` or ``()`` means the
   flag was not given),
2. environment variables ``DANDELION_<KEY>`` (``DANDELION_RELAY_MAX_CIRCUITS=32``; lists
   comma-separated; booleans 1/0, true/false, yes/no; an empty value counts as unset),
3. the TOML file named by ``--config PATH`` or, failing that, ``$DANDELION_CONFIG``,
4. built-in defaults.

Each key is taken whole from the highest layer that sets it: a list given on the command line
replaces the file's list rather than extending it. Every error names the key and the layer it
came from, so the user knows which of the four places to fix.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from multiaddr import Multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import PeerId

Mode = Literal["daemon", "join"]
Reachability = Literal["auto", "public", "private"]

MODES: tuple[str, ...] = get_args(Mode)
REACHABILITIES: tuple[str, ...] = get_args(Reachability)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

ENV_PREFIX = "DANDELION_"
CONFIG_ENV_VAR = "DANDELION_CONFIG"
STABLE_PORT = 4001

# sun_path is 108 bytes on Linux and 104 on macOS, one of which is the terminating NUL.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")
_NETWORK_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_UNSPECIFIED_HOSTS = ("0.0.0.0", "::")
_WEB_HOST = re.compile(r"[A-Za-z0-9.:\-]{1,253}")
_RUN_ID = re.compile(r"[A-Za-z0-9._\-]{0,128}")
_PORT_PROTOCOLS = ("tcp", "udp")

# How a key's value is spelled in text (environment) and native (TOML, flags) form.
_KINDS: dict[str, str] = {
    "data_dir": "path",
    "identity": "path",
    "listen": "addrs",
    "announce": "addrs",
    "bootstrap": "addrs",
    "network": "choice",
    "relay": "bool",
    "relays": "int",
    "relay_max_reservations": "int",
    "relay_max_circuits": "int",
    "relay_circuit_bytes": "int",
    "relay_circuit_seconds": "int",
    "relay_reservation_ttl": "int",
    "relay_reservations_per_network": "int",
    "frame_budget_bytes": "int",
    "dht_store_bytes": "int",
    "reachability": "choice",
    "upnp": "bool",
    "dial_timeout": "float",
    "request_timeout": "float",
    "catch_up_wait": "float",
    "log_level": "choice",
    "webui": "bool",
    "webui_host": "str",
    "webui_port": "int",
    "data_port": "int",
    "dataset": "path",
    "run_config": "path",
    "train_data": "path",
    "run": "str",
    "worker": "bool",
}

CONFIG_KEYS: tuple[str, ...] = tuple(_KINDS)
"""Every key settable by flag, environment variable or file (``mode`` is the subcommand)."""


def env_var_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_DATA_HOME/dandelion``, else ``~/.local/share/dandelion``."""
    xdg = env.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "dandelion"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "share" / "dandelion"


def default_listen(mode: str, relay: bool, reachability: str) -> tuple[str, ...]:
    """A fixed, forwardable port where others are expected to dial us; any free port otherwise.

    A joining process is usually short-lived and may share the machine with a daemon, so it
    takes a random port unless it serves as a relay or is declared public.
    """
    if mode == "daemon" or relay or reachability == "public":
        return (f"/ip4/0.0.0.0/tcp/{STABLE_PORT}",)
    return ("/ip4/0.0.0.0/tcp/0",)


def check_socket_path(path: Path) -> Path:
    """Refuse a Unix socket path the kernel cannot bind; raises ``ConfigError`` with advice."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"control socket path {path} is {size} bytes long, over the {MAX_SOCKET_PATH_BYTES}-"
            f"byte limit for Unix socket paths; choose a shorter data directory with "
            f"{flag_name('data_dir')} or {env_var_name('data_dir')} (for example ~/.dandelion)"
        )
    return path


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon needs to start. Construct directly or through ``load_config``.

    An empty ``listen`` is replaced by the mode's default (see ``default_listen``). Invalid
    values raise ``ConfigError`` naming the key.
    """

    data_dir: Path = field(default_factory=default_data_dir)
    identity: Path | None = None
    listen: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    network: str = "dandelion"
    relay: bool = False
    relays: int = 2
    relay_max_reservations: int = 128
    relay_max_circuits: int = 64
    relay_circuit_bytes: int = 1 << 30
    relay_circuit_seconds: int = 3600
    relay_reservation_ttl: int = 3600
    relay_reservations_per_network: int = 8
    """Reservations our relay grants to peers of one IPv4 /24 or IPv6 /48."""
    frame_budget_bytes: int = 64 * 1024 * 1024
    """Memory for frames remote peers have begun but not finished sending, in total; one peer
    may hold 1/8 of it, one network (IPv4 /24, IPv6 /48) 1/4."""
    dht_store_bytes: int = 64 * 1024 * 1024
    """What remote peers can make this node hold as DHT records, in bytes, in total."""
    reachability: Reachability = "auto"
    upnp: bool = False
    dial_timeout: float = 10.0
    request_timeout: float = 10.0
    catch_up_wait: float = 9.0
    log_level: str = "info"
    webui: bool = True
    webui_host: str = "127.0.0.1"
    webui_port: int = 4080
    data_port: int = 0
    """TCP port of the data plane (averaging traffic); 0: any free port. With an ``announce``
    address that forwards to this machine, the port forwarded for the data plane."""
    dataset: Path | None = None
    run_config: Path | None = None
    train_data: Path | None = None
    run: str = ""
    worker: bool = True
    mode: Mode = "daemon"

    def __post_init__(self) -> None:
        try:
            _validate({f.name: getattr(self, f.name) for f in fields(self)})
        except _Invalid as problem:
            raise ConfigError(problem.render({})) from None
        if not self.listen:
            object.__setattr__(
                self, "listen", default_listen(self.mode, self.relay, self.reachability)
            )

    @property
    def identity_path(self) -> Path:
        return self.identity if self.identity is not None else self.data_dir / "identity.key"

    @property
    def control_socket_path(self) -> Path:
        """``data_dir/control.sock``; raises ``ConfigError`` if too long to bind."""
        return check_socket_path(self.data_dir / "control.sock")


def load_config(
    mode: str,
    cli: Mapping[str, Any],
    env: Mapping[str, str] = os.environ,
    config_file: Path | None = None,
) -> DaemonConfig:
    """Merge flags > environment > TOML file > defaults into a validated ``DaemonConfig``.

    ``cli`` maps key names (``CONFIG_KEYS``) to flag values; ``None`` and empty sequences mean
    "not given". ``config_file`` is the ``--config`` value; without it ``$DANDELION_CONFIG`` is
    used. Relative paths in the file are taken relative to the file's directory.

    Raises:
        ConfigError: a value is invalid, the file is unreadable or has an unknown key; the
            message names the key and where it was set.
        TypeError: ``cli`` holds a key that is not a configuration key (a caller bug).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    stray = sorted(k for k in cli if k not in _KINDS)
    if stray:
        raise TypeError(f"not configuration keys: {', '.join(stray)}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    file_path = Path(config_file) if config_file is not None else None
    file_named_by = flag_name("config")
    if file_path is None and env.get(CONFIG_ENV_VAR, "").strip():
        file_path, file_named_by = Path(env[CONFIG_ENV_VAR].strip()), CONFIG_ENV_VAR
    if file_path is not None:
        file_path = _absolute(file_path.expanduser(), Path.cwd())
        source = f"config file {file_path}"
        for key, raw in _read_toml(file_path, file_named_by).items():
            values[key] = _convert(key, source, _from_native, raw, file_path.parent)
            sources[key] = source

    for key in _KINDS:
        var = env_var_name(key)
        text = env.get(var, "")
        if text.strip():
            source = f"environment variable {var}"
            values[key] = _convert(key, source, _from_text, text)
            sources[key] = source

    for key, raw in cli.items():
        if raw is None or (isinstance(raw, tuple | list) and not raw):
            continue
        source = f"command-line flag {flag_name(key)}"
        values[key] = _convert(key, source, _from_cli, raw)
        sources[key] = source

    values.setdefault("data_dir", default_data_dir(env))
    values["mode"] = mode
    try:
        _validate(values)
    except _Invalid as problem:
        raise ConfigError(problem.render(sources)) from None
    return DaemonConfig(**values)


class _Invalid(Exception):
    """A bad value, before we know (or say) which layer it came from."""

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.keys = keys
        self.message = message

    def render(self, sources: Mapping[str, str]) -> str:
        text = f"{' and '.join(self.keys)}: {self.message}"
        if len(self.keys) == 1 and self.keys[0] in sources:
            text += f" (from {sources[self.keys[0]]})"
        elif sources:
            where = "; ".join(f"{k} from {sources.get(k, 'the default')}" for k in self.keys)
            text += f" ({where})"
        return text


def _convert(key: str, source: str, parse: Callable[..., Any], *args: Any) -> Any:
    try:
        return parse(key, *args)
    except _Invalid as problem:
        raise ConfigError(problem.render({key: source})) from None


def _absolute(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def _read_toml(path: Path, named_by: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (from {named_by}) does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key in data:
        if key == "mode":
            raise ConfigError(
                f"config file {path}: 'mode' cannot be set in a file; it is chosen by the "
                "command (daemon or join)"
            )
        if key not in _KINDS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"config file {path}: unknown key {key!r}{hint} "
                "(docs/configuration.md lists every key)"
            )
    return data


def _from_text(key: str, text: str) -> Any:
    """Parse an environment variable's value."""
    kind = _KINDS[key]
    text = text.strip()
    if kind == "path":
        return _absolute(Path(text).expanduser(), Path.cwd())
    if kind == "addrs":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _Invalid((key,), f"expected 1/0, true/false or yes/no, got {text!r}")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise _Invalid((key,), f"expected an integer, got {text!r}") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise _Invalid((key,), f"expected a number, got {text!r}") from None
    if kind == "str":
        return text
    return text.lower()


def _from_native(key: str, value: Any, base: Path) -> Any:
    """Check a TOML or flag value's type; relative paths are taken from ``base``."""
    kind = _KINDS[key]
    if kind == "path":
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise _Invalid((key,), f"expected a path string, got {value!r}")
        return _absolute(Path(value).expanduser(), base)
    if kind == "str":
        if not isinstance(value, str):
            raise _Invalid((key,), f"expected a string, got {value!r}")
        return value.strip()
    if kind == "addrs":
        if isinstance(value, str):
            raise _Invalid((key,), f"expected a list of multiaddrs, e.g. [{value!r}]")
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise _Invalid((key,), f"expected a list of multiaddr strings, got {value!r}")
        return tuple(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _Invalid((key,), f"expected true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid((key,), f"expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid((key,), f"expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise _Invalid((key,), f"expected a string, got {value!r}")
    return value.lower()


def _from_cli(key: str, value: Any) -> Any:
    # Flag parsers may hand over raw strings (e.g. a comma-separated --bootstrap); read those
    # the same way as the environment so both spellings work on the command line.
    if isinstance(value, str) and _KINDS[key] not in ("path", "str"):
        return _from_text(key, value)
    value = _from_native(key, value, Path.cwd())
    if _KINDS[key] == "addrs":
        value = tuple(part for item in value for part in _from_text(key, item))
    return value


def _validate(values: Mapping[str, Any]) -> None:
    """Check types, ranges and consistency of fully typed values; raises ``_Invalid``."""
    for key in ("data_dir", "identity", "dataset", "run_config", "train_data"):
        value = values.get(key)
        if value is None and key != "data_dir":
            continue
        if not isinstance(value, Path):
            raise _Invalid((key,), f"expected a Path, got {value!r}")
    for key in ("listen", "announce", "bootstrap"):
        value = values.get(key, ())
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise _Invalid((key,), f"expected a tuple of multiaddr strings, got {value!r}")
        for addr in value:
            _check_addr(key, addr)
    for key in ("relay", "upnp", "webui", "worker"):
        if not isinstance(values.get(key, False), bool):
            raise _Invalid((key,), f"expected a boolean, got {values[key]!r}")
    for key, default in (("webui_port", 4080), ("data_port", 0)):
        port = values.get(key, default)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise _Invalid(
                (key,), f"must be a TCP port 0-65535 (0: any free port), got {port!r}"
            )
    host = values.get("webui_host", "127.0.0.1")
    if not isinstance(host, str) or not _WEB_HOST.fullmatch(host):
        raise _Invalid(("webui_host",), f"must be an IPv4/IPv6 address or host name, got {host!r}")
    run = values.get("run", "")
    if not isinstance(run, str) or not _RUN_ID.fullmatch(run):
        raise _Invalid(("run",), f"must be a run id (letters, digits, '.', '_', '-'), got {run!r}")
    network = values.get("network", "dandelion")
    if not isinstance(network, str) or not _NETWORK_NAME.fullmatch(network):
        raise _Invalid(
            ("network",),
            f"must be 1-32 of a-z, 0-9 and '-', starting alphanumeric; got {network!r}",
        )
    for key in (
        "relays",
        "relay_max_reservations",
        "relay_max_circuits",
        "relay_circuit_bytes",
        "relay_circuit_seconds",
        "relay_reservation_ttl",
        "relay_reservations_per_network",
        "frame_budget_bytes",
        "dht_store_bytes",
    ):
        value = values.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _Invalid((key,), f"must be a positive integer, got {value!r}")
    for key in ("dial_timeout", "request_timeout"):
        value = values.get(key, 1.0)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise _Invalid((key,), f"must be a positive number of seconds, got {value!r}")
    wait = values.get("catch_up_wait", 0.0)
    if (
        isinstance(wait, bool)
        or not isinstance(wait, int | float)
        or not math.isfinite(wait)
        or wait < 0
    ):
        raise _Invalid(("catch_up_wait",), f"must be 0 or more seconds, got {wait!r}")
    for key, allowed in (
        ("reachability", REACHABILITIES),
        ("log_level", LOG_LEVELS),
        ("mode", MODES),
    ):
        if key in values and values[key] not in allowed:
            raise _Invalid((key,), f"must be one of {', '.join(allowed)}, got {values[key]!r}")
    # A relay that others cannot dial is useless to them and would only advertise a dead hop.
    if values.get("relay") and values.get("reachability") == "private":
        raise _Invalid(
            ("relay", "reachability"),
            "a relay must be reachable; use reachability auto or public, or turn relay off",
        )


def _check_addr(key: str, addr: str) -> None:
    if not addr.strip():
        raise _Invalid((key,), "empty multiaddr")
    try:
        # Some components (e.g. a /p2p/ value that is not a peer id) only fail when read back.
        parts = [(proto.name, value) for proto, value in Multiaddr(addr).items()]
    except (MultiaddrError, ValueError) as exc:
        # The library wraps its reason in layers that each repeat the address; keep the reason.
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        reason = str(root).split(" (string:")[0]
        if reason.startswith("Invalid MultiAddr") and ": " in reason:
            reason = reason.split(": ", 1)[1]
        raise _Invalid((key,), f"{addr!r} is not a valid multiaddr: {reason}") from None
    if not parts:
        raise _Invalid((key,), f"{addr!r} is not a valid multiaddr")
    if key == "listen":
        return
    # Addresses others dial must name a concrete host and port.
    for proto, value in parts:
        if value in _UNSPECIFIED_HOSTS and proto in ("ip4", "ip6"):
            raise _Invalid((key,), f"{addr!r}: {value} is not an address others can dial")
        if proto in _PORT_PROTOCOLS and value == "0":
            raise _Invalid((key,), f"{addr!r}: port 0 cannot be dialled")
    if key == "bootstrap":
        proto, peer = parts[-1]
        if proto != "p2p" or not peer:
            raise _Invalid((key,), f"{addr!r} must end in /p2p/<peer id>")
        try:
            PeerId.from_base58(peer)
        except ValueError as exc:
            raise _Invalid((key,), f"{addr!r}: bad peer id: {exc}") from None
