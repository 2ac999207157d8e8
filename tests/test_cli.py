"""The command line as a user runs it: real processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dandelion_p2p.identity import load_identity
from tests.daemon_proc import DaemonProcess, start_daemon


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dandelion_p2p.cli", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    first = cli("keygen", "--out", str(key))
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    peer_id = load_identity(key).peer_id.to_base58()
    assert f"peer id: {peer_id}" in first.stdout

    again = cli("keygen", "--out", str(key))
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert load_identity(key).peer_id.to_base58() == peer_id

    forced = cli("keygen", "--out", str(key), "--force")
    assert forced.returncode == 0
    assert load_identity(key).peer_id.to_base58() != peer_id


def test_daemon_uses_the_given_identity(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    key = tmp_path / "mine.key"
    assert cli("keygen", "--out", str(key)).returncode == 0
    d = start_daemon(
        "daemon", ["--identity", str(key), "--listen", "/ip4/127.0.0.1/tcp/0"], tmp_path / "d"
    )
    daemons.append(d)
    assert d.peer_id == load_identity(key).peer_id.to_base58()
    assert all(a.endswith(f"/p2p/{d.peer_id}") for a in d.addrs)


def test_status_json_and_clean_shutdown(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    relay = start_daemon("daemon", ["--relay", "--listen", "/ip4/127.0.0.1/tcp/0"],
                         tmp_path / "relay")
    daemons.append(relay)
    assert (tmp_path / "relay" / "identity.key").exists(), "the daemon creates its identity"
    peer = start_daemon(
        "join", [relay.addrs[0], "--reachability", "private", "--listen",
                 "/ip4/127.0.0.1/tcp/0"],
        tmp_path / "peer",
    )
    daemons.append(peer)

    out = cli("status", "--json", "--data-dir", str(tmp_path / "peer"))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["peer_id"] == peer.peer_id
    assert status["addrs"] and all("/p2p-circuit/" in a for a in status["addrs"])
    assert status["connected_peers"] == [
        {"peer_id": relay.peer_id, "connection": "direct",
         "addrs": status["connected_peers"][0]["addrs"], "bandwidth_mbps": None}
    ]
    assert [r["relay"] for r in status["relay_reservations"]] == [relay.peer_id]
    assert status["routing_table_size"] == 1
    for key in ("listen_addrs", "reachable", "dht_mode", "violations", "uptime_s"):
        assert key in status

    relay_status = json.loads(cli("status", "--json", "--data-dir",
                                  str(tmp_path / "relay")).stdout)
    assert relay_status["relay"] is True and relay_status["dht_mode"] == "server"
    assert {p["peer_id"] for p in relay_status["connected_peers"]} == {peer.peer_id}

    human = cli("status", "--data-dir", str(tmp_path / "peer"))
    assert human.returncode == 0 and peer.peer_id in human.stdout

    code, took = peer.stop(signal.SIGINT)
    assert code == 0 and took < 5.0, peer.logs()
    code, took = relay.stop(signal.SIGTERM)
    assert code == 0 and took < 5.0, relay.logs()
    assert not (tmp_path / "relay" / "control.sock").exists()


def test_second_daemon_on_one_data_dir_is_refused(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    first = start_daemon("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0"], tmp_path / "d")
    daemons.append(first)
    second = cli("daemon", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "d"))
    assert second.returncode != 0
    assert "already" in second.stderr.lower()
    assert first.proc.poll() is None
    assert cli("status", "--data-dir", str(tmp_path / "d")).returncode == 0


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, DANDELION_RELAY_MAX_CIRCUITS="0")
    # Independent commands, run at once: each spends its time starting Python.
    with ThreadPoolExecutor(4) as pool:
        runs = [
            pool.submit(cli, "daemon", "--listen", "not-an-address", "--data-dir",
                        str(tmp_path / "x")),
            pool.submit(cli, "join", "/ip4/127.0.0.1/tcp/4001", "--data-dir", str(tmp_path / "y")),
            pool.submit(cli, "status", "--data-dir", str(tmp_path / "nobody")),
            pool.submit(cli, "daemon", "--data-dir", str(tmp_path / "z"), env=env),
        ]
        bad_listen, bad_boot, no_daemon, bad_env = (run.result() for run in runs)
    assert bad_listen.returncode == 2 and "listen" in bad_listen.stderr
    assert bad_boot.returncode == 2 and "/p2p/" in bad_boot.stderr
    assert no_daemon.returncode == 2 and "no daemon" in no_daemon.stderr.lower()
    assert bad_env.returncode == 2 and "DANDELION_RELAY_MAX_CIRCUITS" in bad_env.stderr


def test_commands_find_the_daemon_through_the_environment(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    d = start_daemon("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0"], tmp_path / "env-dir")
    daemons.append(d)
    env = dict(os.environ, DANDELION_DATA_DIR=str(tmp_path / "env-dir"))
    out = cli("status", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["peer_id"] == d.peer_id
