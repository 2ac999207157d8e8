"""Throughput and CPU cost of the data plane between two processes on 127.0.0.1.

One run measures, with the same bytes in the same frames (default 1 GiB in 4 MiB frames):

  direct     a DataPlane channel over its own TCP connection (AES-256-GCM sealed frames,
             credit flow control), the mode peers use when one of them is reachable
  stream     a DataPlane channel in stream mode: the same sealed frames carried by the
             libp2p stream (Noise + yamux), the fallback when no TCP connection is possible
  raw-tcp    a plain trio TCP socket with the same socket options, no framing or sealing:
             the ceiling the direct channel is measured against
  direct-bytes  (on request) the direct channel read with ``receive()``, a new bytes object per
             frame, instead of ``receive_into`` a reused buffer as above and as raw-tcp does

Each process is a minimal libp2p host with a DataPlane (the receiver reachable, the sender
not). The sender's clock runs from its first frame (channel already open) until the receiver's
verdict arrives, so nothing still in socket buffers counts. Each process reports its CPU time
(user + system) over the transfer. The receiver compares every frame with the expected block
(a memcmp, cheap next to the socket copies and the same in every scenario), so a lost,
duplicated, reordered or damaged frame fails the run.

    python benchmarks/dataplane_throughput.py [--size-mb 1024] [--frame-kb 4096] [--json]
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
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import _report
import trio

PURPOSE = "bench"
POOL_BLOCKS = 7  # distinct blocks cycled through, so a dropped or repeated frame is noticed
POOL_SEED = 0xDA7A
MB = 1_000_000
GB = 1_000_000_000
SCENARIOS = ("direct", "stream", "raw-tcp", "direct-bytes")
DEFAULT_SCENARIOS = SCENARIOS[:3]


@dataclass(frozen=True)
class Job:
    frames: int
    frame_size: int
    scenarios: tuple[str, ...]
    rounds: int
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
    mode: str = ""


def payload_pool(frame_size: int) -> list[bytes]:
    rng = random.Random(POOL_SEED)
    return [rng.randbytes(frame_size) for _ in range(POOL_BLOCKS)]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Verdict:
    """What the receiver saw of one transfer."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.pool = payload_pool(job.frame_size)
        self.frames = 0
        self.bad = 0
        self.bytes = 0
        self.cpu0 = cpu_seconds()
        self.t0 = time.perf_counter()

    def add(self, frame: bytes | bytearray) -> None:
        if frame != self.pool[self.frames % POOL_BLOCKS]:
            self.bad += 1
        self.frames += 1
        self.bytes += len(frame)

    def encode(self, error: str = "") -> bytes:
        ok = not error and self.bad == 0 and self.frames == self.job.frames
        return json.dumps(
            {
                "ok": ok,
                "error": error or ("" if ok else f"{self.bad} bad of {self.frames} frames"),
                "bytes": self.bytes,
                "cpu": cpu_seconds() - self.cpu0,
                "seconds": time.perf_counter() - self.t0,
            }
        ).encode()


# ---- processes ---------------------------------------------------------------------------


def child_entry(role: str, conn: Connection, job: Job, peer: dict[str, Any] | None) -> None:
    try:
        trio.run(receiver_main if role == "receiver" else sender_main, conn, job, peer or {})
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc(limit=8)})
    finally:
        conn.close()


async def wait_for_parent(conn: Connection) -> None:
    await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)


def make_host() -> tuple[Any, Any]:
    from dandelion_p2p.identity import Identity
    from dandelion_p2p.net.host import build_host

    identity = Identity.generate()
    return build_host(identity), identity


async def receiver_main(conn: Connection, job: Job, _peer: dict[str, Any]) -> None:
    import multiaddr

    from dandelion_p2p.dataplane.channel import Channel
    from dandelion_p2p.dataplane.service import DataPlane
    from dandelion_p2p.dataplane.session import tune_socket

    host, identity = make_host()

    async def on_channel(channel: Channel) -> None:
        verdict = Verdict(job)
        buf = bytearray(job.frame_size)
        error = ""
        try:
            # The sender's first frame says how to read: into a reused buffer, or as bytes.
            into = await channel.receive() == b"into"
            for _ in range(job.frames):
                if into:
                    n = await channel.receive_into(buf)
                    verdict.add(buf if n == len(buf) else buf[:n])
                else:
                    verdict.add(await channel.receive())
        except Exception as exc:  # reported to the sender, which fails the run
            error = repr(exc)
        await channel.send(verdict.encode(error))
        # Wait for the sender's CLOSE, so our end never closes under frames still in flight.
        with contextlib.suppress(Exception):
            await channel.receive()

    async def on_raw(stream: trio.SocketStream) -> None:
        tune_socket(stream)
        verdict = Verdict(job)
        buf = bytearray(job.frame_size)
        view = memoryview(buf)
        error = ""
        try:
            for _ in range(job.frames):
                got = 0
                while got < job.frame_size:
                    n = await stream.socket.recv_into(view[got:])
                    if n == 0:
                        raise EOFError(f"stream ended after {verdict.bytes + got} bytes")
                    got += n
                verdict.add(buf)
        except Exception as exc:
            error = repr(exc)
        with contextlib.suppress(Exception):
            await stream.send_all(verdict.encode(error))
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        await stream.aclose()

    async with (
        host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        trio.open_nursery() as nursery,
    ):
        plane = DataPlane(
            host, identity, listen_ip="127.0.0.1", reachable=True, channel_timeout=job.timeout
        )
        await nursery.start(plane.run)
        plane.register(PURPOSE, on_channel)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, on_raw, listeners)
        me = host.get_id().to_base58()
        conn.send(
            {
                "addrs": [f"{a}/p2p/{me}" if "/p2p/" not in str(a) else str(a)
                          for a in host.get_addrs()],
                "raw_port": listeners[0].socket.getsockname()[1],
            }
        )
        await wait_for_parent(conn)
        nursery.cancel_scope.cancel()


async def sender_main(conn: Connection, job: Job, peer: dict[str, Any]) -> None:
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from dandelion_p2p.dataplane.service import DataPlane
    from dandelion_p2p.dataplane.session import tune_socket

    pool = payload_pool(job.frame_size)
    host, identity = make_host()
    target = info_from_p2p_addr(multiaddr.Multiaddr(peer["addrs"][0]))

    async def over_channel(plane: DataPlane, direct: bool, into: bool) -> dict[str, Any]:
        channel = await plane.open(target.peer_id, PURPOSE, direct=direct, timeout=30)
        try:
            await channel.send(b"into" if into else b"bytes")
            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            with trio.fail_after(job.timeout):
                for i in range(job.frames):
                    await channel.send(pool[i % POOL_BLOCKS])
                verdict: dict[str, Any] = json.loads(await channel.receive())
            verdict["sender_seconds"] = time.perf_counter() - t0
            verdict["sender_cpu"] = cpu_seconds() - cpu0
            verdict["mode"] = f"{channel.kind}/{channel.mode}"
        finally:
            await channel.aclose()
        return verdict

    async def over_raw() -> dict[str, Any]:
        stream = await trio.open_tcp_stream("127.0.0.1", peer["raw_port"])
        tune_socket(stream)
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        with trio.fail_after(job.timeout):
            for i in range(job.frames):
                await stream.send_all(pool[i % POOL_BLOCKS])
            reply = b""
            while part := await stream.receive_some(65536):
                reply += part
        verdict: dict[str, Any] = json.loads(reply)
        verdict["sender_seconds"] = time.perf_counter() - t0
        verdict["sender_cpu"] = cpu_seconds() - cpu0
        verdict["mode"] = "raw"
        await stream.aclose()
        return verdict

    async with (
        host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        trio.open_nursery() as nursery,
    ):
        plane = DataPlane(
            host, identity, listen_ip="127.0.0.1", reachable=False, channel_timeout=job.timeout
        )
        await nursery.start(plane.run)
        with trio.fail_after(30):
            await host.connect(target)
        for round_no in range(1, job.rounds + 1):
            for scenario in job.scenarios:
                try:
                    if scenario == "raw-tcp":
                        result = await over_raw()
                    else:
                        result = await over_channel(
                            plane,
                            direct=scenario != "stream",
                            into=scenario != "direct-bytes",
                        )
                except Exception as exc:
                    result = {"ok": False, "error": repr(exc)}
                conn.send({"scenario": scenario, "round": round_no, **result})
        conn.send({"done": True})
        await wait_for_parent(conn)
        nursery.cancel_scope.cancel()


# ---- orchestration ------------------------------------------------------------------------


def receive(conn: Connection, timeout: float, who: str) -> dict[str, Any]:
    if not conn.poll(timeout):
        raise TimeoutError(f"{who} sent nothing within {timeout:.0f} s")
    msg: dict[str, Any] = conn.recv()
    if "error" in msg and "scenario" not in msg:
        raise RuntimeError(f"{who} failed:\n{msg['error']}")
    return msg


def stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=5)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)


def run(job: Job) -> list[Measurement]:
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    results: list[Measurement] = []
    r_parent, r_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    try:
        receiver = ctx.Process(target=child_entry, args=("receiver", r_child, job, None))
        receiver.start()
        procs.append(receiver)
        where = receive(r_parent, 60, "receiver")
        sender = ctx.Process(target=child_entry, args=("sender", s_child, job, where))
        sender.start()
        procs.append(sender)
        while True:
            msg = receive(s_parent, job.timeout + 90, "sender")
            if msg.get("done"):
                break
            m = Measurement(
                scenario=msg["scenario"],
                round=msg["round"],
                ok=bool(msg.get("ok")),
                error=msg.get("error", ""),
                bytes=msg.get("bytes", 0),
                seconds=msg.get("sender_seconds", 0.0),
                sender_cpu=msg.get("sender_cpu", 0.0),
                receiver_cpu=msg.get("cpu", 0.0),
                mode=msg.get("mode", ""),
            )
            results.append(m)
            rate = m.bytes / m.seconds / MB if m.ok else float("nan")
            status = "ok" if m.ok else f"FAILED: {m.error[:200]}"
            print(
                f"  round {m.round} {m.scenario:<8} {rate:8.1f} MB/s  cpu sender "
                f"{m.sender_cpu:5.2f} s receiver {m.receiver_cpu:5.2f} s  {m.mode}  {status}",
                flush=True,
            )
        for end in (r_parent, s_parent):
            end.send("exit")
    finally:
        stop(procs)
        for pipe in (r_parent, r_child, s_parent, s_child):
            pipe.close()
    return results


def summarise(runs: list[Measurement], order: tuple[str, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in order:
        mine = [m for m in runs if m.scenario == name]
        good = [m for m in mine if m.ok]
        rows.append(
            {
                "scenario": name,
                "runs": len(mine),
                "verified": len(good),
                "mb_per_s": _report.median([m.bytes / m.seconds / MB for m in good]),
                "sender_cpu_s_per_gb": _report.median(
                    [m.sender_cpu / (m.bytes / GB) for m in good]
                ),
                "receiver_cpu_s_per_gb": _report.median(
                    [m.receiver_cpu / (m.bytes / GB) for m in good]
                ),
            }
        )
    raw = next((r for r in rows if r["scenario"] == "raw-tcp"), None)
    for row in rows:
        base = raw["mb_per_s"] if raw else float("nan")
        row["throughput_vs_raw"] = row["mb_per_s"] / base if base == base and base else float("nan")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Data plane throughput (direct TCP, libp2p stream mode) against raw TCP, "
        "between two local processes."
    )
    parser.add_argument("--size-mb", type=float, default=1024, help="MiB per transfer (1024)")
    parser.add_argument("--frame-kb", type=int, default=4096, help="KiB per frame (4096)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all scenarios (1)")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {SCENARIOS} (default: the first three)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per transfer (300)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also emit the results as JSON: to stdout, or to PATH if given",
    )
    args = parser.parse_args()
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if any(s not in SCENARIOS for s in scenarios) or not scenarios:
        parser.error(f"--scenarios must name some of {SCENARIOS}")
    frame_size = args.frame_kb * 1024
    frames = max(1, int(args.size_mb * 1024 * 1024) // frame_size)
    if args.rounds < 1 or frame_size < 4096 or frame_size > 16 * 1024 * 1024:
        parser.error("--rounds must be positive and --frame-kb in 4..16384")
    job = Job(frames, frame_size, scenarios, args.rounds, args.timeout)
    total = frames * frame_size
    print(
        f"moving {total / 2**20:.0f} MiB per transfer in {frame_size // 1024} KiB frames, "
        f"{args.rounds} round(s), {os.cpu_count()} CPUs; MB = 10^6 B, GB = 10^9 B",
        flush=True,
    )
    runs = run(job)
    rows = summarise(runs, scenarios)
    print()
    print(
        _report.format_table(
            ["scenario", "MB/s", "x raw TCP", "send CPU s/GB", "recv CPU s/GB", "verified"],
            [
                [
                    r["scenario"],
                    r["mb_per_s"],
                    r["throughput_vs_raw"],
                    r["sender_cpu_s_per_gb"],
                    r["receiver_cpu_s_per_gb"],
                    f"{r['verified']}/{r['runs']}",
                ]
                for r in rows
            ],
        )
    )
    ratio = next((r["throughput_vs_raw"] for r in rows if r["scenario"] == "direct"), None)
    if ratio is not None and ratio == ratio:
        print(f"\ndirect / raw TCP throughput: {ratio:.2f}")
    payload = {
        "benchmark": "dataplane_throughput",
        "settings": {"bytes_per_transfer": total, "frame_size": frame_size,
                     "rounds": args.rounds, "scenarios": list(scenarios)},
        "environment": _report.environment(),
        "direct_over_raw": ratio,
        "summary": rows,
        "runs": [asdict(m) for m in runs],
    }
    if args.json == "-":
        print(json.dumps(payload, indent=2))
    elif args.json:
        path = _report.write_json("dataplane_throughput", payload, args.json)
        print(f"\nresults written to {path}")
    return 0 if runs and all(m.ok for m in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
