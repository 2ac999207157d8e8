from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dandelion_p2p.config import (
    CONFIG_KEYS,
    DaemonConfig,
    default_data_dir,
    env_var_name,
    flag_name,
    load_config,
)
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity

DOCS = Path(__file__).resolve().parent.parent / "docs"
PEER = Identity.from_seed(bytes(32)).peer_id.to_base58()
BOOT = f"/ip4/198.51.100.1/tcp/4001/p2p/{PEER}"
HOME_ENV = {"HOME": "/home/ada"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the dataclass ------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = DaemonConfig(data_dir=Path("/d"))
    assert cfg.mode == "daemon"
    assert cfg.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert cfg.announce == cfg.bootstrap == ()
    assert (cfg.relay, cfg.upnp, cfg.reachability) == (False, False, "auto")
    assert cfg.relay_max_reservations == 128
    assert cfg.relay_max_circuits == 64
    assert cfg.relay_circuit_bytes == 1 << 30
    assert cfg.relay_circuit_seconds == cfg.relay_reservation_ttl == 3600
    assert cfg.dial_timeout == cfg.request_timeout == 10.0
    assert cfg.catch_up_wait == 9.0
    assert cfg.log_level == "info"


@pytest.mark.parametrize(
    ("kwargs", "port"),
    [
        ({"mode": "join"}, 0),
        ({"mode": "join", "relay": True}, 4001),
        ({"mode": "join", "reachability": "public"}, 4001),
        ({"mode": "daemon", "reachability": "private"}, 4001),
    ],
)
def test_default_listen_follows_mode(kwargs: dict[str, Any], port: int) -> None:
    assert DaemonConfig(data_dir=Path("/d"), **kwargs).listen == (f"/ip4/0.0.0.0/tcp/{port}",)


def test_explicit_listen_is_kept() -> None:
    cfg = DaemonConfig(data_dir=Path("/d"), mode="join", listen=("/ip6/::/udp/4001/quic-v1",))
    assert cfg.listen == ("/ip6/::/udp/4001/quic-v1",)


def test_frozen() -> None:
    cfg = DaemonConfig(data_dir=Path("/d"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.relay = True  # type: ignore[misc]


def test_derived_paths() -> None:
    cfg = DaemonConfig(data_dir=Path("/d"))
    assert cfg.identity_path == Path("/d/identity.key")
    assert cfg.control_socket_path == Path("/d/control.sock")
    assert DaemonConfig(data_dir=Path("/d"), identity=Path("/k")).identity_path == Path("/k")


def test_control_socket_path_too_long() -> None:
    cfg = DaemonConfig(data_dir=Path("/" + "d" * 100))
    with pytest.raises(ConfigError, match=r"control socket path .* over the 10\d-byte limit"):
        _ = cfg.control_socket_path
    with pytest.raises(ConfigError, match="--data-dir"):
        _ = cfg.control_socket_path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen": ("nonsense",)}, "listen: 'nonsense' is not a valid multiaddr"),
        ({"listen": ("/ip4/1.2.3.4/tcp/65536",)}, "listen: .* not in range"),
        ({"listen": ("",)}, "listen: empty multiaddr"),
        ({"listen": "/ip4/0.0.0.0/tcp/1"}, "listen: expected a tuple"),
        ({"announce": ("/ip4/0.0.0.0/tcp/4001",)}, "announce: .* not an address others can dial"),
        ({"announce": ("/ip4/203.0.113.7/tcp/0",)}, "announce: .* port 0"),
        ({"bootstrap": ("/ip4/1.2.3.4/tcp/4001",)}, r"bootstrap: .* must end in /p2p/<peer id>"),
        ({"bootstrap": (f"/ip4/1.2.3.4/tcp/0/p2p/{PEER}",)}, "bootstrap: .* port 0"),
        (
            {"bootstrap": ("/ip4/1.2.3.4/tcp/1/p2p/QmNotAPeerId",)},
            "bootstrap: .* is not a valid multiaddr",
        ),
        ({"relay_max_reservations": 0}, "relay_max_reservations: must be a positive integer"),
        ({"relay_max_circuits": -1}, "relay_max_circuits: must be a positive integer"),
        ({"relay_circuit_bytes": True}, "relay_circuit_bytes: must be a positive integer"),
        ({"relay_circuit_seconds": 1.5}, "relay_circuit_seconds: must be a positive integer"),
        ({"relay_reservation_ttl": 0}, "relay_reservation_ttl: must be a positive integer"),
        ({"dial_timeout": 0}, "dial_timeout: must be a positive number"),
        ({"request_timeout": float("inf")}, "request_timeout: must be a positive number"),
        ({"catch_up_wait": -1.0}, "catch_up_wait: must be 0 or more seconds"),
        ({"catch_up_wait": float("nan")}, "catch_up_wait: must be 0 or more seconds"),
        ({"reachability": "sometimes"}, "reachability: must be one of auto, public, private"),
        ({"log_level": "loud"}, "log_level: must be one of debug"),
        ({"mode": "serve"}, "mode: must be one of daemon, join"),
        ({"relay": "yes"}, "relay: expected a boolean"),
        ({"data_dir": "/d"}, "data_dir: expected a Path"),
        ({"relay": True, "reachability": "private"}, "relay and reachability: a relay must be"),
    ],
)
def test_invalid_values_name_the_key(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("data_dir", Path("/d"))
    with pytest.raises(ConfigError, match=message):
        DaemonConfig(**kwargs)


def test_catch_up_wait_may_be_zero() -> None:
    assert DaemonConfig(data_dir=Path("/d"), catch_up_wait=0).catch_up_wait == 0
    assert load_config("daemon", {"catch_up_wait": "0"}, {}).catch_up_wait == 0.0


def test_valid_addresses_accepted() -> None:
    cfg = DaemonConfig(
        data_dir=Path("/d"),
        listen=("/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/4001"),
        announce=("/dns4/node.example.org/tcp/4001", "/ip6/2001:db8::1/udp/4001/quic-v1"),
        bootstrap=(
            BOOT,
            f"/dns6/boot.example.org/tcp/4001/p2p/{PEER}",
            f"/ip4/198.51.100.2/tcp/4001/p2p/{PEER}/p2p-circuit/p2p/{PEER}",
        ),
    )
    assert len(cfg.bootstrap) == 3


# --- defaults that depend on the environment -----------------------------------------------------


def test_default_data_dir() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/xdg", **HOME_ENV}) == Path("/xdg/dandelion")
    assert default_data_dir(HOME_ENV) == Path("/home/ada/.local/share/dandelion")
    # A relative XDG_DATA_HOME is invalid per the XDG spec and ignored.
    assert default_data_dir({"XDG_DATA_HOME": "rel", **HOME_ENV}) == Path(
        "/home/ada/.local/share/dandelion"
    )


def test_load_config_defaults_use_given_env() -> None:
    cfg = load_config("join", {}, env={"XDG_DATA_HOME": "/xdg"})
    assert cfg.data_dir == Path("/xdg/dandelion")
    assert cfg.mode == "join"
    assert cfg.listen == ("/ip4/0.0.0.0/tcp/0",)
    assert cfg == DaemonConfig(data_dir=Path("/xdg/dandelion"), mode="join")


def test_load_config_bad_mode() -> None:
    with pytest.raises(ConfigError, match="mode must be one of daemon, join"):
        load_config("serve", {}, env={})


def test_load_config_unknown_cli_key_is_a_bug() -> None:
    with pytest.raises(TypeError, match="not configuration keys: verbose"):
        load_config("daemon", {"verbose": True}, env={})


# --- precedence ----------------------------------------------------------------------------------


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", "relay_max_circuits = 1\n")
    env = {"DANDELION_RELAY_MAX_CIRCUITS": "2"}
    cli = {"relay_max_circuits": 3}
    assert load_config("daemon", cli, env, conf).relay_max_circuits == 3
    assert load_config("daemon", {}, env, conf).relay_max_circuits == 2
    assert load_config("daemon", {}, {}, conf).relay_max_circuits == 1
    assert load_config("daemon", {}, {}, None).relay_max_circuits == 64


def test_layers_are_merged_key_by_key(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", 'log_level = "debug"\nupnp = true\n')
    cfg = load_config("daemon", {"dial_timeout": 3.0}, {"DANDELION_UPNP": "no"}, conf)
    assert (cfg.log_level, cfg.upnp, cfg.dial_timeout) == ("debug", False, 3.0)


def test_cli_none_and_empty_mean_not_given(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", f'bootstrap = ["{BOOT}"]\nrelay = true\n')
    cli: dict[str, Any] = {"bootstrap": (), "relay": None, "listen": [], "data_dir": None}
    cfg = load_config("daemon", cli, {"DANDELION_DATA_DIR": "/d"}, conf)
    assert cfg.bootstrap == (BOOT,)
    assert cfg.relay is True
    assert cfg.data_dir == Path("/d")


def test_cli_list_replaces_file_list(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", f'bootstrap = ["{BOOT}"]\n')
    other = f"/ip4/198.51.100.9/tcp/4001/p2p/{PEER}"
    assert load_config("daemon", {"bootstrap": (other,)}, {}, conf).bootstrap == (other,)


def test_cli_lists_accept_commas(tmp_path: Path) -> None:
    other = f"/ip4/198.51.100.9/tcp/4001/p2p/{PEER}"
    cfg = load_config("daemon", {"bootstrap": (f"{BOOT},{other}",)}, {})
    assert cfg.bootstrap == (BOOT, other)
    assert load_config("daemon", {"bootstrap": f"{BOOT}, {other}"}, {}).bootstrap == (BOOT, other)


def test_cli_accepts_strings_for_typed_flags() -> None:
    cli = {"relay": "yes", "relay_max_circuits": "7", "dial_timeout": "2"}
    cfg = load_config("daemon", cli, {})
    assert (cfg.relay, cfg.relay_max_circuits, cfg.dial_timeout) == (True, 7, 2.0)


# --- environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)],
)
def test_env_booleans(text: str, value: bool) -> None:
    assert load_config("daemon", {}, {"DANDELION_UPNP": text}).upnp is value


def test_env_bad_boolean_names_the_variable() -> None:
    with pytest.raises(
        ConfigError,
        match=r"upnp: expected 1/0, true/false or yes/no, got 'maybe' "
        r"\(from environment variable DANDELION_UPNP\)",
    ):
        load_config("daemon", {}, {"DANDELION_UPNP": "maybe"})


def test_env_values_parsed() -> None:
    other = f"/ip4/198.51.100.9/tcp/4001/p2p/{PEER}"
    env = {
        "DANDELION_BOOTSTRAP": f" {BOOT} ,{other},",
        "DANDELION_RELAY_CIRCUIT_BYTES": "1_000_000",
        "DANDELION_REQUEST_TIMEOUT": "2.5",
        "DANDELION_LOG_LEVEL": "DEBUG",
        "DANDELION_REACHABILITY": "Public",
        "DANDELION_IDENTITY": "/keys/node.key",
    }
    cfg = load_config("daemon", {}, env)
    assert cfg.bootstrap == (BOOT, other)
    assert cfg.relay_circuit_bytes == 1_000_000
    assert cfg.request_timeout == 2.5
    assert (cfg.log_level, cfg.reachability) == ("debug", "public")
    assert cfg.identity_path == Path("/keys/node.key")


def test_env_empty_value_counts_as_unset(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", 'log_level = "error"\n')
    assert load_config("daemon", {}, {"DANDELION_LOG_LEVEL": ""}, conf).log_level == "error"


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        ("DANDELION_RELAY_MAX_CIRCUITS", "many", "relay_max_circuits: expected an integer"),
        ("DANDELION_RELAY_MAX_CIRCUITS", "0", "relay_max_circuits: must be a positive integer"),
        ("DANDELION_DIAL_TIMEOUT", "soon", "dial_timeout: expected a number"),
        ("DANDELION_DIAL_TIMEOUT", "nan", "dial_timeout: must be a positive number"),
        ("DANDELION_LISTEN", "/ip4/1.2.3.4/tcp/99999", "listen: .* not in range"),
    ],
)
def test_env_errors_name_the_variable(var: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config("daemon", {}, {var: text})
    assert f"from environment variable {var}" in str(info.value)


def test_relative_env_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("daemon", {}, {"DANDELION_DATA_DIR": "dd"}).data_dir == tmp_path / "dd"


# --- the TOML file -------------------------------------------------------------------------------


def test_file_found_through_env(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", "relay_max_reservations = 5\n")
    cfg = load_config("daemon", {}, {"DANDELION_CONFIG": str(conf)})
    assert cfg.relay_max_reservations == 5


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    named = write(tmp_path / "flag.toml", "relay_max_reservations = 5\n")
    other = write(tmp_path / "env.toml", "relay_max_reservations = 6\n")
    cfg = load_config("daemon", {}, {"DANDELION_CONFIG": str(other)}, named)
    assert cfg.relay_max_reservations == 5


def test_file_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", 'data_dir = "state"\nidentity = "keys/me.key"\n')
    cfg = load_config("daemon", {}, {}, conf)
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.identity_path == tmp_path / "keys" / "me.key"


def test_file_unknown_key_names_key_and_suggests(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", "relay_max_circuit = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'relay_max_circuit'") as info:
        load_config("daemon", {}, {}, conf)
    assert str(conf) in str(info.value)
    assert "did you mean 'relay_max_circuits'" in str(info.value)


def test_file_mode_key_refused(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", 'mode = "join"\n')
    with pytest.raises(ConfigError, match="'mode' cannot be set in a file"):
        load_config("daemon", {}, {}, conf)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('relay = "yes"', "relay: expected true or false"),
        ('relay_max_circuits = "3"', "relay_max_circuits: expected an integer"),
        ("dial_timeout = true", "dial_timeout: expected a number"),
        ('listen = "/ip4/0.0.0.0/tcp/1"', "listen: expected a list of multiaddrs"),
        ("bootstrap = [1]", "bootstrap: expected a list of multiaddr strings"),
        ("data_dir = 3", "data_dir: expected a path string"),
        ('bootstrap = ["/ip4/1.2.3.4/tcp/4001"]', r"bootstrap: .* must end in /p2p/<peer id>"),
        ("[relay]\nmax = 3", "relay: expected true or false"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    conf = write(tmp_path / "d.toml", text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config("daemon", {}, {}, conf)
    assert f"config file {conf}" in str(info.value)


def test_file_missing_names_where_it_was_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist") as info:
        load_config("daemon", {}, {}, tmp_path / "nope.toml")
    assert "--config" in str(info.value)
    with pytest.raises(ConfigError, match=r"from DANDELION_CONFIG\) does not exist"):
        load_config("daemon", {}, {"DANDELION_CONFIG": str(tmp_path / "nope.toml")})


def test_file_syntax_error(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", "relay = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config("daemon", {}, {}, conf)


def test_cross_field_error_names_both_sources(tmp_path: Path) -> None:
    conf = write(tmp_path / "d.toml", 'reachability = "private"\n')
    with pytest.raises(ConfigError) as info:
        load_config("daemon", {"relay": True}, {}, conf)
    text = str(info.value)
    assert "relay from command-line flag --relay" in text
    assert f"reachability from config file {conf}" in text


# --- documentation -------------------------------------------------------------------------------


def test_every_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    rows = {
        m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, flags=re.MULTILINE)
    }
    assert set(rows) == set(CONFIG_KEYS)
    for key, row in rows.items():
        assert f"`{flag_name(key)}" in row
        assert f"`{env_var_name(key)}`" in row


def test_example_file_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    example = DOCS / "example-daemon.toml"
    with example.open("rb") as f:
        keys = set(tomllib.load(f))
    assert keys <= set(CONFIG_KEYS)
    cfg = load_config("daemon", {}, {}, example)
    assert cfg.relay and cfg.reachability == "public"
    assert cfg.data_dir == tmp_path / ".local" / "share" / "dandelion"
