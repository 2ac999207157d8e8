"""The ``dandelion-p2p`` command."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click
import trio

from dandelion_p2p import __version__
from dandelion_p2p.cli_common import CONTROL_OPTIONS, Options, add_options, call_daemon, fail
from dandelion_p2p.config import load_config
from dandelion_p2p.errors import DandelionError
from dandelion_p2p.identity import Identity, write_identity

NODE_OPTIONS: Options = [
    (("--data-dir",), {"type": click.Path(path_type=Path), "help": "State directory."}),
    (("--identity",), {"type": click.Path(path_type=Path), "help": "ed25519 key file."}),
    (("--config", "config_file"), {"type": click.Path(path_type=Path), "help": "TOML file."}),
    (("--listen",), {"multiple": True, "help": "Multiaddr to listen on (repeatable)."}),
    (("--announce",), {"multiple": True, "help": "Multiaddr to advertise (repeatable)."}),
    (("--bootstrap",), {"multiple": True, "help": "Bootstrap peer multiaddr (repeatable)."}),
    (
        ("--data-port",),
        {"type": int, "help": "Data plane TCP port (0: any; with --announce, the one forwarded)."},
    ),
    (("--network",), {"help": "Swarm name to join."}),
    (("--relays",), {"type": int, "help": "Relay reservations to keep when behind NAT."}),
    (
        ("--reachability",),
        {"type": click.Choice(["auto", "public", "private"]), "help": "Override detection."},
    ),
    (("--upnp/--no-upnp",), {"default": None, "help": "Ask the router for a port mapping."}),
    (("--dial-timeout",), {"type": float}),
    (("--request-timeout",), {"type": float}),
    (
        ("--frame-budget-bytes",),
        {"type": int, "help": "Memory for frames peers have begun sending (all peers)."},
    ),
    (
        ("--catch-up-wait",),
        {"type": float, "help": "Seconds a starting worker waits for peers to catch up from."},
    ),
    (("--log-level",), {"type": click.Choice(["debug", "info", "warning", "error", "critical"])}),
    (("--webui/--no-webui",), {"default": None, "help": "Serve the web UI (default on)."}),
    (("--webui-host",), {"help": "Web UI address (default 127.0.0.1; others warn)."}),
    (("--webui-port",), {"type": int, "help": "Web UI port (0: any free port)."}),
    (("--run",), {"help": "Run id to train in."}),
    (("--worker/--no-worker",), {"default": None, "help": "Start the training worker."}),
    (
        ("--train-data",),
        {"type": click.Path(path_type=Path), "help": "Images the worker trains on."},
    ),
]

DATASET_ROLE_OPTIONS: Options = [
    (("--dataset",), {"type": click.Path(path_type=Path), "help": "Packed dataset to serve."}),
    (("--run-config",), {"type": click.Path(path_type=Path), "help": "Run config to publish."}),
]

RELAY_OPTIONS: Options = [
    (("--relay/--no-relay",), {"default": None, "help": "Serve as a circuit relay hop."}),
    (("--relay-max-reservations",), {"type": int}),
    (("--relay-max-circuits",), {"type": int}),
    (("--relay-circuit-bytes",), {"type": int}),
    (("--relay-circuit-seconds",), {"type": int}),
    (("--relay-reservation-ttl",), {"type": int}),
    (("--relay-reservations-per-network",), {"type": int}),
]


@click.group()
@click.version_option(__version__, prog_name="dandelion-p2p")
def main() -> None:
    """Train Stable Diffusion together over a peer-to-peer swarm."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), help="Key file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keygen(out: Path | None, force: bool) -> None:
    """Create an ed25519 identity key (mode 0600) and print its peer id.

    Without --out the key goes where the daemon looks for it: the configured identity file,
    else identity.key in the data dir.
    """
    identity = Identity.generate()
    try:
        path = out or load_config("daemon", {}).identity_path
        write_identity(path, identity, force=force)
    except DandelionError as exc:
        fail(str(exc))
    click.echo(f"peer id: {identity.peer_id.to_base58()}")
    click.echo(f"key file: {path}")


def _run_node(mode: str, config_file: Path | None, values: dict[str, Any]) -> None:
    from dandelion_p2p.daemon import configure_logging, run_daemon
    from dandelion_p2p.loghub import LogHub

    try:
        config = load_config(mode, values, config_file=config_file)
        config.control_socket_path  # noqa: B018 - fails early, before any network activity
    except DandelionError as exc:
        fail(str(exc))
    logs = LogHub()
    configure_logging(config.log_level, logs)

    def ready(node: Any) -> None:
        click.echo(f"peer id: {node.peer_id.to_base58()}", err=False)
        for addr in node.full_addrs():
            click.echo(f"address: {addr}")
        click.echo(f"reachable: {'yes' if node.reachable else 'no (behind NAT, using relays)'}")
        click.echo(f"control socket: {config.control_socket_path}")
        click.echo("ready", err=False)
        sys.stdout.flush()

    try:
        trio.run(lambda: run_daemon(config, on_ready=ready, logs=logs))
    except DandelionError as exc:
        fail(str(exc))
    except BaseExceptionGroup as group:
        # A service that fails to start (a bad --dataset, say) raises inside nurseries.
        matched, rest = group.split(DandelionError)
        if matched is None or rest is not None:
            raise
        fail("; ".join(str(e) for e in _leaves(matched)))
    except KeyboardInterrupt:
        pass


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


@main.command()
@add_options(NODE_OPTIONS)
@add_options(RELAY_OPTIONS)
@add_options(DATASET_ROLE_OPTIONS)
def daemon(config_file: Path | None, **values: Any) -> None:
    """Run a swarm node (use --relay on a public machine to help peers behind NAT)."""
    _run_node("daemon", config_file, values)


@main.command()
@click.argument("bootstrap_peers", nargs=-1, required=True)
@add_options(NODE_OPTIONS)
def join(bootstrap_peers: tuple[str, ...], config_file: Path | None, **values: Any) -> None:
    """Join a swarm from behind NAT through the given bootstrap peers (multiaddrs)."""
    values["bootstrap"] = tuple(values.get("bootstrap") or ()) + bootstrap_peers
    _run_node("join", config_file, values)


def _print_status(s: dict[str, Any]) -> None:
    click.echo(f"peer id:        {s['peer_id']}")
    click.echo(f"network:        {s['network']}  (relay: {'yes' if s['relay'] else 'no'})")
    click.echo(f"reachable:      {'yes' if s['reachable'] else 'no'}  (DHT {s['dht_mode']})")
    click.echo("addresses:")
    for a in s["addrs"]:
        click.echo(f"  {a}")
    click.echo(f"routing table:  {s['routing_table_size']} peers")
    click.echo(f"relay reservations: {len(s['relay_reservations'])}")
    for r in s["relay_reservations"]:
        click.echo(f"  {r['relay']} (expires in {r['expires_in']} s)")
    click.echo(f"connected peers: {len(s['connected_peers'])}")
    for p in s["connected_peers"]:
        click.echo(f"  {p['peer_id']} {p['connection']}")
    training = s.get("training")
    if isinstance(training, dict):
        run = training.get("run") or "no run"
        click.echo(f"training:       {training.get('state')} ({run}, global step "
                   f"{training.get('global_step', 0)})")
        if training.get("detail"):
            click.echo(f"  {training['detail']}")


@main.command()
@add_options(CONTROL_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(data_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Show a running daemon's peer id, addresses, peers, reservations and routing table."""
    result = call_daemon(data_dir, config_file, "status", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_status(result)


@main.command()
@add_options(CONTROL_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def peers(data_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """List the members of the swarm, as announced in the DHT."""
    result = call_daemon(data_dir, config_file, "members", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for peer, info in sorted(result["members"].items()):
        kind = "public" if info["reachable"] else "behind NAT"
        click.echo(f"{peer}  {kind}  {' '.join(info['roles'])}")


@main.command()
@click.argument("peer")
@click.argument("text")
@add_options(CONTROL_OPTIONS)
def send(peer: str, text: str, data_dir: Path | None, config_file: Path | None) -> None:
    """Send a signed note to PEER (found through the DHT) and print its signed receipt."""
    result = call_daemon(data_dir, config_file, "send", {"peer": peer, "text": text})
    click.echo(f"verified receipt from {peer}: {result['receipt']}")


# Subcommands that live beside their subsystem: (module, click command attribute). Each
# module imports its heavy dependencies (torch, Pillow, ...) inside the command body.
EXTRA_COMMANDS: tuple[tuple[str, str], ...] = (
    ("dandelion_p2p.dataset.cli", "dataset"),
    ("dandelion_p2p.runconfig.cli", "runs"),
    ("dandelion_p2p.worker.cli", "worker_command"),
)


def _register_extra_commands() -> None:
    for module_name, attr in EXTRA_COMMANDS:
        main.add_command(getattr(importlib.import_module(module_name), attr))


_register_extra_commands()

if __name__ == "__main__":
    main()
