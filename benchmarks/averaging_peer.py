"""One averaging peer as its own process: a swarm node, a data plane and an averager.

Driven by ``averaging_throughput.py`` and by the fault tests. It prints ``ready <peer id>
<address>`` once its node is up, waits for a line ``go`` on stdin, then runs ``--rounds``
all-reduce rounds over a vector it derives from ``--seed`` and the round number (so a
coordinator can recompute every peer's input), and writes one JSON line per round to
``--out``: the round report, wall and CPU seconds, peak RSS. ``--save`` also writes the
averaged buffer of each round as ``<out>.round<r>.npy``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import trio

from dandelion_p2p.averaging import compression
from dandelion_p2p.averaging.averager import Averager, AveragingSettings, NoGroup
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings
from dandelion_p2p.daemon import configure_logging, dataplane_addresses
from dandelion_p2p.dataplane.forwarding import DataPortForwarding
from dandelion_p2p.dataplane.messages import format_endpoint
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import NodeSettings, SwarmNode
from dandelion_p2p.services import DHT_NAMESPACES

PIECE = 1 << 20
_blocks: dict[int, np.ndarray] = {}


def _block(seed: int) -> np.ndarray:
    """One 4 MiB block per peer: a part shared by every peer (peers training one model hold
    similar weights) plus a peer-specific part of 10 %."""
    if seed not in _blocks:
        shared = np.random.default_rng(0).standard_normal(PIECE, dtype=np.float32)
        own = np.random.default_rng([seed]).standard_normal(PIECE, dtype=np.float32)
        _blocks[seed] = shared + np.float32(1.0) + own * np.float32(0.1)
    return _blocks[seed]


def fill_peer_vector(out: np.ndarray, seed: int, round_: int) -> None:
    """The input a peer with ``seed`` averages in ``round_``: its block, repeated with a
    different shift per piece and per round. Cheap to make (no full-size temporary, no
    random numbers per round), so making it does not disturb other peers' rounds."""
    block = _block(seed)
    for i, start in enumerate(range(0, out.size, PIECE)):
        piece = out[start : start + PIECE]
        np.add(block[: piece.size], np.float32(0.001 * (i % 97) + 0.01 * round_), out=piece)


def peer_vector(seed: int, round_: int, size: int) -> np.ndarray:
    out = np.empty(size, dtype=np.float32)
    fill_peer_vector(out, seed, round_)
    return out


def corrupt(vector: np.ndarray, mode: str, rng: np.random.Generator) -> None:
    """Distort this peer's own input (the ``nan`` attack happens at encoding instead)."""
    if mode == "scale":
        vector *= np.float32(1000.0)
    elif mode == "noise":
        vector[:] = rng.standard_normal(vector.size, dtype=np.float32) * np.float32(1e4)


def send_nan_payloads() -> None:
    """For a byzantine peer that sends NaN: every payload it encodes is laced with NaN (an
    honest encoder refuses non-finite input, so the attack goes in after it)."""
    raw = compression.get_codec("none")

    def encode(array: np.ndarray) -> bytes:
        poisoned = np.array(array, dtype="<f4")
        poisoned[::3] = np.nan
        return poisoned.tobytes()

    raw.encode = encode  # type: ignore[method-assign]
    raw.encode_view = encode  # type: ignore[method-assign]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def mark_mid_round(averager: Averager, received: int) -> None:
    """Write ``mid-round N`` to stderr once round N has received ``received`` bytes, so a
    test can stop or kill this process while chunks are in flight, on any machine speed."""
    round_ = 1
    while True:
        moved = averager.bytes_moved(round_)
        if moved is not None and moved[1] >= received:
            print(f"mid-round {round_}", file=sys.stderr, flush=True)
            round_ += 1
        await trio.sleep(0.0005)


async def main(args: argparse.Namespace) -> None:
    identity = Identity.generate()
    bootstrap = (args.bootstrap,) if args.bootstrap else ()
    settings = NodeSettings(
        listen=(f"/ip4/{args.ip}/tcp/0",),
        bootstrap=bootstrap,
        reachability=args.reachability,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        upnp=args.upnp,
    )
    averaging = AveragingSettings(
        codec=args.codec,
        mode=args.mode,
        max_chunk=args.chunk_elements,
        chunk_timeout=args.chunk_timeout,
        matchmaking=MatchmakingSettings(
            gather_window=args.gather, settle=args.settle, min_group=2, max_group=args.max_group,
            end_early=not args.wait_window,
        ),
    )
    if args.byzantine == "nan":
        send_nan_payloads()
    node = SwarmNode(identity, settings, namespaces=DHT_NAMESPACES)
    out = Path(args.out)
    async with node.running(), trio.open_nursery() as nursery:
        # Frames hold at most a 4 MiB chunk plus its header; a window of two such frames per
        # channel keeps the links busy without pooling tens of MiB per member.
        frame = args.chunk_elements * 4 + (1 << 20)
        # Bound and advertised as the daemon does it (``--ip 0.0.0.0`` as its default listen).
        bind_ip, advertise_ip, direct = dataplane_addresses(node)
        dataplane = DataPlane(
            node.host,
            identity,
            listen_ip=bind_ip,
            reachable=node.reachable and direct,
            max_frame=frame,
            window_bytes=2 * frame,
        )
        await nursery.start(dataplane.run)
        if advertise_ip is not None and dataplane.bound_port is not None:
            dataplane.advertise = format_endpoint(advertise_ip, dataplane.bound_port)
        await nursery.start(DataPortForwarding(node, dataplane).run)
        averager = Averager(
            signer=identity,
            records=node.records,
            links=node,
            reputation=node,
            dataplane=dataplane,
            background=node.background,
            run=args.run.encode(),
            settings=averaging,
        )
        addr = node.full_addrs()[0]
        print(f"ready {identity.peer_id.to_base58()} {addr}", flush=True)
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() != "go":
            nursery.cancel_scope.cancel()
            return
        if args.mark_mid_round:
            nursery.start_soon(mark_mid_round, averager, args.mark_mid_round)
        rng = np.random.default_rng(args.seed + 1000)
        buffer = np.empty(args.size, dtype=np.float32)
        with out.open("w") as results:
            for round_ in range(1, args.rounds + 1):
                fill_peer_vector(buffer, args.seed, round_)
                if args.byzantine != "none":
                    corrupt(buffer, args.byzantine, rng)
                wall, cpu = time.perf_counter(), cpu_seconds()
                entry: dict[str, object] = {"round": round_, "peer": identity.peer_id.to_base58()}
                try:
                    report = await averager.all_reduce(buffer, args.weight, round_)
                    entry["report"] = report.to_dict()
                except NoGroup as exc:
                    entry["no_group"] = str(exc)
                entry["seconds"] = time.perf_counter() - wall
                entry["cpu_seconds"] = cpu_seconds() - cpu
                entry["peak_rss_mb"] = peak_rss_mb()
                entry["scores"] = node.status()["scores"]
                results.write(json.dumps(entry) + "\n")
                results.flush()
                if args.save:
                    np.save(f"{out}.round{round_}.npy", buffer)
                if args.pause:
                    await trio.sleep(args.pause)
        print("done", flush=True)
        nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--bootstrap", default="")
    p.add_argument("--reachability", default="public", choices=["public", "auto", "private"])
    p.add_argument("--data-dir", default="")
    p.add_argument("--run", default="bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=25_000_000, help="float32 elements")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--codec", default="none")
    p.add_argument("--mode", default="mean", choices=["mean", "centered_clip"])
    p.add_argument("--chunk-elements", type=int, default=1 << 20)
    p.add_argument("--chunk-timeout", type=float, default=5.0)
    p.add_argument("--gather", type=float, default=1.0)
    p.add_argument("--settle", type=float, default=0.3)
    p.add_argument("--wait-window", action="store_true",
                   help="wait the whole gather window every round (no early end)")
    p.add_argument("--max-group", type=int, default=16)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    p.add_argument("--byzantine", default="none", choices=["none", "scale", "noise", "nan"])
    p.add_argument("--save", action="store_true")
    p.add_argument("--upnp", action="store_true", help="map our ports on the NAT's router")
    p.add_argument("--mark-mid-round", type=int, default=0, metavar="BYTES",
                   help="log 'mid-round N' once round N has received BYTES")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    configure_logging("info")
    trio.run(main, parse_args())
