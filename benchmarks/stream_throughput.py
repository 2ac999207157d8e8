"""Bulk-transfer throughput of our libp2p stack against a raw TCP socket, sender and receiver
in separate processes on 127.0.0.1.

Every scenario moves the same number of bytes with the same write size:

  1-stream       one Noise+yamux stream on our tuned host
  N-streams      N streams on one connection (the bytes split evenly)
  N-conns        N connections (N sender hosts in the sender process), one stream each
  raw-tcp        one plain trio TCP socket
  1-stream-64k   (--untuned) one stream with py-libp2p's default 65,536-byte yamux frame

The sender's clock runs from the first write (connections and streams already open) until
the receiver has acknowledged every byte, so nothing still sitting in socket buffers counts.
Each process reports its own CPU time (user + system) over the transfer. The receiver counts
the bytes of every stream and folds a strided sample of them (one byte in 64, by stream
offset) into a CRC-32 that is compared with the expected value: a truncated, duplicated or
reordered frame fails the run, while the check costs well under 1 % of the receiver's time
(a full checksum would cost as much CPU as the raw socket itself and blur the comparison).

Run ``python benchmarks/stream_throughput.py --help`` for options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import _report
import trio

PROTOCOL = "/dandelion/bench/bulk/1.0.0"
# py-libp2p's own yamux frame size, which the tuned host lowers to Noise's plaintext limit.
UNTUNED_YAMUX_FRAME = 65_536
SAMPLE_STRIDE = 64
# Distinct random blocks cycled through by the sender; with a single repeated block a lost or
# duplicated block would go unnoticed by the sampled checksum.
POOL_BLOCKS = 7
POOL_SEED = 0x5EED
MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "libp2p" or "tcp"
    streams: int = 1
    connections: int = 1
    tuned: bool = True


@dataclass(frozen=True)
class Job:
    """What both processes of one transfer need to know."""

    scenario: Scenario
    stream_sizes: tuple[int, ...]
    expected_crc: dict[int, int]  # stream size -> sampled CRC of that many bytes
    write_size: int
    read_size: int
    timeout: float


@dataclass
class Measurement:
    scenario: str
    round: int
    ok: bool
    error: str = ""
    bytes: int = 0
    seconds: float = 0.0
    sender_cpu: float = 0.0
    receiver_cpu: float = 0.0
    receiver_seconds: float = 0.0
    window_waits: int = 0
    sender_cpu_split: dict[str, float] = field(default_factory=dict)
    receiver_cpu_split: dict[str, float] = field(default_factory=dict)


# ---- payload and verification -------------------------------------------------------------


def payload_pool(write_size: int) -> list[bytes]:
    rng = random.Random(POOL_SEED)
    return [rng.randbytes(write_size) for _ in range(POOL_BLOCKS)]


def payload_chunks(pool: list[bytes], size: int) -> Iterator[bytes]:
    """The stream content: pool blocks in turn, the last one cut to length."""
    sent = 0
    i = 0
    while sent < size:
        block = pool[i % len(pool)]
        if size - sent < len(block):
            block = block[: size - sent]
        yield block
        sent += len(block)
        i += 1


def sample_crc(chunk: bytes, offset: int, crc: int) -> int:
    """Fold the bytes at stream offsets divisible by SAMPLE_STRIDE into ``crc``."""
    return zlib.crc32(chunk[(-offset) % SAMPLE_STRIDE :: SAMPLE_STRIDE], crc)


def expected_crc(pool: list[bytes], size: int) -> int:
    crc = 0
    offset = 0
    for chunk in payload_chunks(pool, size):
        crc = sample_crc(chunk, offset, crc)
        offset += len(chunk)
    return crc


class Tally:
    """Byte count and sampled checksum of one received stream."""

    def __init__(self) -> None:
        self.count = 0
        self.crc = 0

    def add(self, chunk: bytes) -> None:
        self.crc = sample_crc(chunk, self.count, self.crc)
        self.count += len(chunk)

    def verdict(self, job: Job, size: int) -> dict[str, Any]:
        want = job.expected_crc[size]
        return {
            "bytes": self.count,
            "expected_bytes": size,
            "crc": self.crc,
            "expected_crc": want,
            "ok": self.count == size and self.crc == want,
        }


# ---- process plumbing ---------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def cpu_delta(start: tuple[float, float]) -> dict[str, float]:
    end = cpu_seconds()
    return {"user": end[0] - start[0], "system": end[1] - start[1]}


def child_entry(role: str, conn: Connection, job: Job, peer: dict[str, Any] | None) -> None:
    """Entry point of a sender or receiver process; failures travel back as ``error``."""
    try:
        main = ROLES[(job.scenario.kind, role)]
        trio.run(main, conn, job, peer or {})
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc(limit=6)})
    finally:
        conn.close()


async def wait_for_parent(conn: Connection) -> None:
    """Stay up (keeping our end of the connections open) until the parent says we are done."""
    await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)


# ---- libp2p roles -------------------------------------------------------------------------


def libp2p_host(tuned: bool) -> Any:
    import libp2p.stream_muxer.yamux.yamux as yamux

    from dandelion_p2p.identity import Identity
    from dandelion_p2p.net.host import build_host

    host = build_host(Identity.generate())
    if not tuned:
        # build_host applied our frame size; put py-libp2p's default back (read at call time).
        yamux.MAX_MESSAGE_SIZE = UNTUNED_YAMUX_FRAME
    return host


async def libp2p_receiver(conn: Connection, job: Job, _peer: dict[str, Any]) -> None:
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.network.stream.exceptions import StreamEOF

    host = libp2p_host(job.scenario.tuned)
    verdicts: list[dict[str, Any]] = []
    all_done = trio.Event()
    clock: dict[str, Any] = {}

    async def handler(stream: Any) -> None:
        if "cpu" not in clock:
            clock["cpu"] = cpu_seconds()
            clock["t0"] = time.perf_counter()
        # The sender announces which of the stream sizes this stream carries.
        header = b""
        while len(header) < 8:
            header += await stream.read(8 - len(header))
        size = int.from_bytes(header, "big")
        tally = Tally()
        while True:
            try:
                chunk = await stream.read(job.read_size)
            except StreamEOF:
                break
            if not chunk:
                break
            tally.add(chunk)
        verdict = tally.verdict(job, size)
        verdicts.append(verdict)
        await stream.write(json.dumps(verdict).encode())
        await stream.close()
        if len(verdicts) == len(job.stream_sizes):
            clock["t1"] = time.perf_counter()
            clock["cpu_used"] = cpu_delta(clock["cpu"])
            all_done.set()

    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(TProtocol(PROTOCOL), handler)
        conn.send({"addrs": [str(a) for a in host.get_addrs()]})
        with trio.fail_after(job.timeout):
            await all_done.wait()
        conn.send(
            {
                "verdicts": verdicts,
                "cpu": clock["cpu_used"],
                "seconds": clock["t1"] - clock["t0"],
            }
        )
        await wait_for_parent(conn)


async def libp2p_sender(conn: Connection, job: Job, peer: dict[str, Any]) -> None:
    from contextlib import AsyncExitStack

    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.peer.peerinfo import info_from_p2p_addr

    scenario = job.scenario
    pool = payload_pool(job.write_size)
    target = info_from_p2p_addr(multiaddr.Multiaddr(peer["addrs"][0]))
    acks: list[dict[str, Any]] = []

    async def push(stream: Any, size: int) -> None:
        await stream.write(size.to_bytes(8, "big"))
        for chunk in payload_chunks(pool, size):
            await stream.write(chunk)
        await stream.close()
        reply = b""
        while True:
            try:
                part = await stream.read()
            except StreamEOF:
                break
            if not part:
                break
            reply += part
        acks.append(json.loads(reply))

    async with AsyncExitStack() as stack:
        # N connections to one peer need N hosts: a host keeps one connection per peer.
        hosts = [libp2p_host(scenario.tuned) for _ in range(scenario.connections)]
        for host in hosts:
            await stack.enter_async_context(host.run(listen_addrs=[]))
        streams: list[Any] = []
        with trio.fail_after(30):
            for host in hosts:
                await host.connect(target)
            for i in range(len(job.stream_sizes)):
                host = hosts[i % len(hosts)]
                streams.append(await host.new_stream(target.peer_id, [TProtocol(PROTOCOL)]))
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        with trio.fail_after(job.timeout):
            async with trio.open_nursery() as nursery:
                for stream, size in zip(streams, job.stream_sizes, strict=True):
                    nursery.start_soon(push, stream, size)
        seconds = time.perf_counter() - t0
        # Each time a yamux writer finds the send window empty it polls every 10 ms, so this
        # count explains throughput lost to flow control rather than to CPU.
        waits = sum(getattr(s.muxed_stream, "_zero_window_waits", 0) for s in streams)
        conn.send({"seconds": seconds, "cpu": cpu_delta(cpu0), "acks": acks, "window_waits": waits})
        await wait_for_parent(conn)


# ---- raw TCP roles ------------------------------------------------------------------------


async def tcp_receiver(conn: Connection, job: Job, _peer: dict[str, Any]) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    conn.send({"port": port})
    with trio.fail_after(job.timeout):
        stream = await listeners[0].accept()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        size = job.stream_sizes[0]
        tally = Tally()
        while True:
            chunk = await stream.receive_some(job.read_size)
            if not chunk:
                break
            tally.add(chunk)
        verdict = tally.verdict(job, size)
        await stream.send_all(json.dumps(verdict).encode())
        await stream.aclose()
        seconds = time.perf_counter() - t0
        used = cpu_delta(cpu0)
    conn.send({"verdicts": [verdict], "cpu": used, "seconds": seconds})
    await wait_for_parent(conn)


async def tcp_sender(conn: Connection, job: Job, peer: dict[str, Any]) -> None:
    pool = payload_pool(job.write_size)
    stream = await trio.open_tcp_stream("127.0.0.1", peer["port"])
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    with trio.fail_after(job.timeout):
        for chunk in payload_chunks(pool, job.stream_sizes[0]):
            await stream.send_all(chunk)
        await stream.send_eof()
        reply = b""
        while part := await stream.receive_some(65_536):
            reply += part
    seconds = time.perf_counter() - t0
    await stream.aclose()
    conn.send({"seconds": seconds, "cpu": cpu_delta(cpu0), "acks": [json.loads(reply)]})
    await wait_for_parent(conn)


ROLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("libp2p", "receiver"): libp2p_receiver,
    ("libp2p", "sender"): libp2p_sender,
    ("tcp", "receiver"): tcp_receiver,
    ("tcp", "sender"): tcp_sender,
}


# ---- orchestration ------------------------------------------------------------------------


def receive(conn: Connection, timeout: float, who: str) -> dict[str, Any]:
    if not conn.poll(timeout):
        raise TimeoutError(f"{who} sent nothing within {timeout:.0f} s")
    msg: dict[str, Any] = conn.recv()
    if "error" in msg:
        raise RuntimeError(f"{who} failed:\n{msg['error']}")
    return msg


def stop(procs: list[Any]) -> None:
    """End the processes this run started: politely first, then by force."""
    for proc in procs:
        proc.join(timeout=5)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def run_transfer(job: Job, round_no: int) -> Measurement:
    ctx = mp.get_context("spawn")
    name = job.scenario.name
    procs: list[Any] = []
    pipes: list[Connection] = []
    try:
        r_parent, r_child = ctx.Pipe()
        pipes += [r_parent, r_child]
        receiver = ctx.Process(
            target=child_entry, args=("receiver", r_child, job, None), daemon=True
        )
        receiver.start()
        procs.append(receiver)
        where = receive(r_parent, 60, f"{name} receiver")
        s_parent, s_child = ctx.Pipe()
        pipes += [s_parent, s_child]
        sender = ctx.Process(target=child_entry, args=("sender", s_child, job, where), daemon=True)
        sender.start()
        procs.append(sender)
        sent = receive(s_parent, job.timeout + 90, f"{name} sender")
        got = receive(r_parent, 30, f"{name} receiver")
        for parent_end in (r_parent, s_parent):
            parent_end.send("exit")
        verdicts = got["verdicts"]
        ok = len(verdicts) == len(job.stream_sizes) and all(v["ok"] for v in verdicts)
        moved = sum(v["bytes"] for v in verdicts)
        error = "" if ok else f"verification failed: {verdicts}"
        return Measurement(
            scenario=name,
            round=round_no,
            ok=ok,
            error=error,
            bytes=moved,
            seconds=sent["seconds"],
            sender_cpu=sum(sent["cpu"].values()),
            receiver_cpu=sum(got["cpu"].values()),
            receiver_seconds=got["seconds"],
            window_waits=sent.get("window_waits", 0),
            sender_cpu_split=sent["cpu"],
            receiver_cpu_split=got["cpu"],
        )
    except (RuntimeError, TimeoutError, EOFError, OSError) as exc:
        return Measurement(scenario=name, round=round_no, ok=False, error=str(exc))
    finally:
        stop(procs)
        for pipe in pipes:
            pipe.close()


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    n = args.streams
    out = [
        Scenario("1-stream", "libp2p"),
        Scenario(f"{n}-streams-1-conn", "libp2p", streams=n),
        Scenario(f"{n}-conns", "libp2p", streams=n, connections=n),
        Scenario("raw-tcp", "tcp"),
    ]
    if args.untuned:
        out.append(Scenario("1-stream-64k-frames", "libp2p", tuned=False))
    return out


def split(total: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def summarise(runs: list[Measurement], order: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in order:
        mine = [m for m in runs if m.scenario == name]
        good = [m for m in mine if m.ok]
        rate = [m.bytes / m.seconds / MB for m in good]
        s_cpu = [m.sender_cpu / (m.bytes / GB) for m in good]
        r_cpu = [m.receiver_cpu / (m.bytes / GB) for m in good]
        rows.append(
            {
                "scenario": name,
                "runs": len(mine),
                "verified": len(good),
                "mb_per_s": _report.median(rate),
                "mb_per_s_min": min(rate, default=float("nan")),
                "mb_per_s_max": max(rate, default=float("nan")),
                "sender_cpu_s_per_gb": _report.median(s_cpu),
                "receiver_cpu_s_per_gb": _report.median(r_cpu),
            }
        )
    raw = next((r for r in rows if r["scenario"] == "raw-tcp"), None)
    for row in rows:
        for key, ratio in (
            ("mb_per_s", "throughput_vs_tcp"),
            ("sender_cpu_s_per_gb", "sender_cpu_vs_tcp"),
            ("receiver_cpu_s_per_gb", "receiver_cpu_vs_tcp"),
        ):
            base = raw[key] if raw else float("nan")
            row[ratio] = row[key] / base if base and base == base else float("nan")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Throughput and CPU cost of moving bytes between two local processes over our "
            "libp2p host (Noise + yamux) compared with a raw TCP socket."
        )
    )
    parser.add_argument("--size-mb", type=float, default=512, help="MiB per transfer (512)")
    parser.add_argument("--streams", type=int, default=4, help="N for parallel streams/conns (4)")
    parser.add_argument("--write-kb", type=int, default=256, help="KiB per write call (256)")
    parser.add_argument("--read-kb", type=int, default=256, help="KiB per read call (256)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over all scenarios, interleaved so machine noise hits all alike; "
        "the table shows medians (3)",
    )
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="also run one stream with py-libp2p's default 65,536-byte yamux frame",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per transfer (300)")
    parser.add_argument("--json", metavar="PATH", help="where to write the results JSON")
    args = parser.parse_args()
    _report.exit_on_sigterm()
    if args.streams < 1 or args.rounds < 1 or args.size_mb <= 0 or args.write_kb < 1:
        parser.error("--streams, --rounds, --size-mb and --write-kb must be positive")

    total = int(args.size_mb * 1024 * 1024)
    write_size = args.write_kb * 1024
    pool = payload_pool(write_size)
    plan = scenarios(args)
    jobs: list[Job] = []
    for sc in plan:
        sizes = split(total, sc.streams)
        crcs = {size: expected_crc(pool, size) for size in set(sizes)}
        jobs.append(Job(sc, sizes, crcs, write_size, args.read_kb * 1024, args.timeout))

    print(
        f"moving {total / 2**20:.0f} MiB per transfer in {write_size // 1024} KiB writes, "
        f"{args.rounds} round(s), {os.cpu_count()} CPUs; MB = 10^6 B, GB = 10^9 B",
        flush=True,
    )
    runs: list[Measurement] = []
    for round_no in range(1, args.rounds + 1):
        for job in jobs:
            m = run_transfer(job, round_no)
            runs.append(m)
            status = "ok" if m.ok else f"FAILED: {m.error.strip().splitlines()[-1][:200]}"
            rate = m.bytes / m.seconds / MB if m.ok else float("nan")
            print(
                f"  round {round_no} {m.scenario:<22} {rate:8.1f} MB/s  "
                f"cpu sender {m.sender_cpu:5.2f} s receiver {m.receiver_cpu:5.2f} s  "
                f"window waits {m.window_waits:5d}  {status}",
                flush=True,
            )

    rows = summarise(runs, [sc.name for sc in plan])
    print()
    print(
        _report.format_table(
            [
                "scenario",
                "MB/s",
                "(min-max)",
                "x raw TCP",
                "send CPU s/GB",
                "x TCP",
                "recv CPU s/GB",
                "x TCP",
                "verified",
            ],
            [
                [
                    r["scenario"],
                    r["mb_per_s"],
                    f"{r['mb_per_s_min']:.0f}-{r['mb_per_s_max']:.0f}",
                    r["throughput_vs_tcp"],
                    r["sender_cpu_s_per_gb"],
                    r["sender_cpu_vs_tcp"],
                    r["receiver_cpu_s_per_gb"],
                    r["receiver_cpu_vs_tcp"],
                    f"{r['verified']}/{r['runs']}",
                ]
                for r in rows
            ],
        )
    )
    out = _report.write_json(
        "stream_throughput",
        {
            "benchmark": "stream_throughput",
            "settings": {
                "bytes_per_transfer": total,
                "write_size": write_size,
                "read_size": args.read_kb * 1024,
                "streams": args.streams,
                "rounds": args.rounds,
                "sample_stride": SAMPLE_STRIDE,
            },
            "environment": _report.environment(),
            "summary": rows,
            "runs": [asdict(m) for m in runs],
        },
        args.json,
    )
    print(f"\nresults written to {out}")
    return 0 if all(m.ok for m in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
