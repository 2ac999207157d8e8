"""DHT put/get latency over a swarm of SwarmNodes on loopback, spread over worker processes.

Phases (one run):

  1. start   node 0 (in worker 0) seeds the network; every other node bootstraps from it,
             a few at a time (the parent paces joins across workers). Each SwarmNode
             publishes its peer record while starting.
  2. settle  wait until routing tables and CPU use are steady, then collect routing-table
             sizes, connection counts, memory and idle CPU.
  3. get A   a random plan of (requester, target) pairs, run once as a warm-up (opens the
             connections the lookups need) and again, measured, on the same pairs: lookups of
             the records published at join time.
  4. put     every node re-publishes its peer record, twice; both passes are timed (the
             first reaches nodes that joined after the publisher, the second is warm).
  5. get B   the plan of phase 3 again, measured, now expecting the re-published records.

A get succeeds only if it returns exactly one record, from the expected publisher, with the
expected value and (in phase 5) the newest sequence number; anything else is counted with its
reason. Operations run one at a time by default, so latencies are those of an otherwise idle
swarm (its own upkeep excepted).

``--breakdown`` times the steps of every DHT RPC the requesters make (opening a stream, which
negotiates the protocol, when no kept one is idle; writing the request; waiting for the reply;
closing a stream that is not kept);
``--profile-worker K`` runs cProfile in worker K during the measured get passes.

Run ``python benchmarks/dht_latency.py --help`` for options.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import math
import multiprocessing as mp
import os
import random
import resource
import sys
import time
import traceback
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import _report
import trio

NODES_PER_PROC = 20
GET_PASS_NAMES = ("get A (join-time records)", "get B (after re-publish)")


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    bootstrap: str | None  # None: this worker starts the node that seeds the network
    request_timeout: float
    log_level: int
    breakdown: bool
    health_interval: float  # seconds between connection health checks; 0: off


# ---- worker side ----------------------------------------------------------------------------


def rss_mib() -> float:
    """Resident memory now (Linux); falls back to the peak if /proc is unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StepTimer:
    """Durations of the steps of outgoing DHT RPCs, installed by wrapping module functions.

    Only steps taken inside an outgoing ``request`` are counted (a context variable marks
    them), so the same helpers used by the serving side do not mix in.
    """

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.inside = contextvars.ContextVar("inside_request", default=False)

    def reset(self) -> None:
        self.samples.clear()

    def timed(
        self, name: str, fn: Callable[..., Awaitable[Any]], *, only_inside: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if only_inside and not self.inside.get():
                return await fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.samples[name].append(time.perf_counter() - t0)

        return wrapper

    def install(self) -> None:
        import dandelion_p2p.net.request_streams as request_streams

        original_request = request_streams.RequestStreams.request

        async def request(*args: Any, **kwargs: Any) -> Any:
            token = self.inside.set(True)
            t0 = time.perf_counter()
            try:
                return await original_request(*args, **kwargs)
            finally:
                self.samples["rpc total"].append(time.perf_counter() - t0)
                self.inside.reset(token)

        # ``RequestStreams`` looks these helpers up in its module at call time.
        request_streams.write_message = self.timed(  # type: ignore[assignment]
            "write request", request_streams.write_message, only_inside=True)
        request_streams.read_message = self.timed(  # type: ignore[assignment]
            "await reply", request_streams.read_message, only_inside=True)
        request_streams.close_quietly = self.timed(  # type: ignore[assignment]
            "close stream", request_streams.close_quietly, only_inside=True)
        request_streams.RequestStreams.request = request  # type: ignore[method-assign]

    def add_host(self, host: Any) -> None:
        host.new_stream = self.timed("open stream", host.new_stream, only_inside=True)


class Worker:
    def __init__(self, conn: Connection, cfg: WorkerConfig) -> None:
        self.conn = conn
        self.cfg = cfg
        self.nodes: list[Any] = []
        self.stop = trio.Event()
        self.profiler: Any = None
        self.steps = StepTimer()
        self.get_latency: list[float] = []  # per-get latency while steps are collected

    def send(self, msg: dict[str, Any]) -> None:
        self.conn.send(msg)

    async def hold(self, node: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with node.running():
            task_status.started()
            await self.stop.wait()

    def settings(self, bootstrap: str | None) -> Any:
        from dandelion_p2p.net.node import NodeSettings

        return NodeSettings(
            listen=("/ip4/127.0.0.1/tcp/0",),
            bootstrap=(bootstrap,) if bootstrap else (),
            reachability="public",
            dial_timeout=self.cfg.request_timeout,
            request_timeout=self.cfg.request_timeout,
        )

    async def start_node(self, nursery: trio.Nursery, bootstrap: str | None) -> Any:
        from dandelion_p2p.identity import Identity
        from dandelion_p2p.net.node import SwarmNode

        node = SwarmNode(Identity.generate(), self.settings(bootstrap))
        await nursery.start(self.hold, node)
        self.nodes.append(node)
        if self.cfg.breakdown:
            self.steps.add_host(node.host)
        return node

    async def join(self, nursery: trio.Nursery, bootstrap: str) -> None:
        """Start one node (the parent paces joins across all workers)."""
        try:
            node = await self.start_node(nursery, bootstrap)
        except Exception as exc:
            self.send({"event": "join_failed", "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        self.send({"event": "joined", "node": self.describe(node), "local": self.nodes.index(node)})

    def describe(self, node: Any) -> dict[str, Any]:
        from dandelion_p2p.net.announce import encode_announcement

        return {
            "peer_id": node.peer_id.to_bytes(),
            "value": encode_announcement(node.announcement()),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "event": "stats",
            "worker": self.cfg.index,
            "table_sizes": [len(n.dht.table) if n.dht else 0 for n in self.nodes],
            "connections": [len(n.host.get_network().get_connections()) for n in self.nodes],
            "stored": [len(n.dht.store) if n.dht else 0 for n in self.nodes],
            "rss_mib": rss_mib(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cpu_s": cpu_seconds(),
            "wall_s": time.perf_counter(),
        }

    async def do_get(self, msg: dict[str, Any]) -> None:
        from dandelion_p2p.net.announce import PEER_NAMESPACE

        node = self.nodes[msg["node"]]
        target: bytes = msg["target"]
        t0 = time.perf_counter()
        try:
            records = await node.dht.get(PEER_NAMESPACE, target)
            latency = time.perf_counter() - t0
            reason = judge(records, target, msg["value"], msg["seq"])
        except Exception as exc:
            latency = time.perf_counter() - t0
            reason = f"error: {type(exc).__name__}: {exc}"[:200]
        if self.cfg.breakdown:
            self.get_latency.append(latency)
        self.send(
            {
                "event": "done",
                "id": msg["id"],
                "latency": latency,
                "fail": reason,
                "requester_table": len(node.dht.table),
            }
        )

    def holders(self, targets: list[tuple[bytes, int | None]]) -> list[int]:
        """Per (target, seq): how many of our nodes store a live peer record published by the
        target with at least that sequence number (any, for None)."""
        from dandelion_p2p.net.announce import PEER_NAMESPACE
        from dandelion_p2p.net.dht.node import now_ms
        from dandelion_p2p.net.dht.records import routing_key

        t = now_ms()
        counts = []
        for target, seq in targets:
            rkey = routing_key(PEER_NAMESPACE, target)
            counts.append(
                sum(
                    any(
                        r.publisher == target and (seq is None or r.seq >= seq)
                        for r in node.dht.store.get(rkey, t)
                    )
                    for node in self.nodes
                    if node.dht is not None
                )
            )
        return counts

    async def do_put(self, msg: dict[str, Any]) -> None:
        from dandelion_p2p.net.announce import (
            ANNOUNCEMENT_TTL,
            PEER_NAMESPACE,
            encode_announcement,
        )

        node = self.nodes[msg["node"]]
        value = encode_announcement(node.announcement())
        t0 = time.perf_counter()
        try:
            stored = await node.dht.put(
                PEER_NAMESPACE, node.identity.peer_id_bytes, value, ANNOUNCEMENT_TTL
            )
            # Our nodes are DHT servers and count their own copy: below 2, no other node
            # holds the record and nobody else can find it.
            fail = "" if stored >= 2 else "stored on no other node"
        except Exception as exc:
            stored = 0
            fail = f"error: {type(exc).__name__}: {exc}"[:200]
        latency = time.perf_counter() - t0
        self.send(
            {
                "event": "done",
                "id": msg["id"],
                "latency": latency,
                "fail": fail,
                "stored": stored,
                # The sequence number put() just signed; gets must return at least this one.
                "seq": node.dht._seq,
                "value": value,
            }
        )

    def profile(self, on: bool, path: str | None) -> None:
        import cProfile

        if on:
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        elif self.profiler is not None:
            self.profiler.disable()
            if path:
                self.profiler.dump_stats(path)
            self.profiler = None

    async def commands(self, nursery: trio.Nursery) -> None:
        while True:
            msg: dict[str, Any] = await trio.to_thread.run_sync(
                self.conn.recv, abandon_on_cancel=True
            )
            cmd = msg["cmd"]
            if cmd == "join":
                nursery.start_soon(self.join, nursery, msg["bootstrap"])
            elif cmd == "get":
                nursery.start_soon(self.do_get, msg)
            elif cmd == "put":
                nursery.start_soon(self.do_put, msg)
            elif cmd == "stats":
                self.send(self.stats())
            elif cmd == "holders":
                self.send({"event": "holders", "counts": self.holders(msg["targets"])})
            elif cmd == "profile":
                self.profile(msg["on"], msg.get("path"))
                self.send({"event": "ack"})
            elif cmd == "steps":
                samples = {k: list(v) for k, v in self.steps.samples.items()}
                samples["get total"] = list(self.get_latency)
                self.steps.reset()
                self.get_latency.clear()
                self.send({"event": "steps", "samples": samples})
            elif cmd == "exit":
                self.stop.set()
                return

    async def run(self) -> None:
        override_health_checks(self.cfg.health_interval)
        if self.cfg.breakdown:
            self.steps.install()
        async with trio.open_nursery() as nursery:
            if self.cfg.bootstrap is None:
                seed = await self.start_node(nursery, None)
                self.send(
                    {
                        "event": "bootstrap",
                        "addr": seed.full_addrs()[0],
                        "node": self.describe(seed),
                    }
                )
            await self.commands(nursery)
            # Nodes shut down when ``stop`` is set; pending operations are abandoned.
            nursery.cancel_scope.deadline = trio.current_time() + 20


def override_health_checks(interval: float) -> None:
    """Change the connection health checks of hosts built from now on in this process.

    Every connection end is pinged once per interval (each ping opens a stream and negotiates
    a protocol). A deployed node pays that for its own few dozen connections; here one core
    carries a hundred nodes' worth, and at 200 nodes the pings alone saturate both cores,
    fail, and tear down connections, so the swarm would measure its own overload instead of
    DHT latency. Hence checks are off unless asked for.
    """
    import dandelion_p2p.net.host as host_module

    build = host_module.connection_config

    def patched(**kwargs: Any) -> Any:
        config = build(**kwargs)
        config.enable_health_monitoring = interval > 0
        if interval > 0:
            config.health_check_interval = interval
        return config

    host_module.connection_config = patched


def judge(records: list[Any], target: bytes, value: bytes, seq: int | None) -> str:
    """Empty string if ``records`` is exactly the expected publisher's record, else why not."""
    if not records:
        return "no record"
    if any(r.publisher != target for r in records):
        return "record from another publisher"
    if len(records) != 1:
        return f"{len(records)} records"
    record = records[0]
    if record.value != value:
        return "unexpected value"
    if seq is not None and record.seq < seq:
        return "stale record (older seq)"
    return ""


def worker_entry(conn: Connection, cfg: WorkerConfig) -> None:
    import libp2p  # noqa: F401  (configures its loggers on import; ours must come after)

    logging.basicConfig(
        level=cfg.log_level, format=f"w{cfg.index} %(levelname)s %(name)s: %(message)s"
    )
    # libp2p logs every failed ping and dial at WARNING with its own handler; as in the
    # daemon, only the benchmark's own findings should reach the console.
    logging.getLogger("libp2p").setLevel(
        logging.WARNING if cfg.log_level <= logging.WARNING else logging.CRITICAL
    )
    try:
        trio.run(Worker(conn, cfg).run)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"event": "error", "error": traceback.format_exc(limit=8)})
    finally:
        conn.close()


# ---- parent side ----------------------------------------------------------------------------


@dataclass
class Handle:
    proc: Any
    conn: Connection
    index: int


@dataclass
class NodeInfo:
    peer_id: bytes
    worker: int
    local: int
    value: bytes
    seq: int | None = None


class Swarm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = mp.get_context("spawn")
        self.handles: list[Handle] = []
        self.nodes: list[NodeInfo] = []
        self.next_id = 0

    def spawn(self, index: int, bootstrap: str | None) -> Handle:
        parent, child = self.ctx.Pipe()
        cfg = WorkerConfig(
            index=index,
            bootstrap=bootstrap,
            request_timeout=self.args.request_timeout,
            log_level=logging.WARNING if self.args.verbose else logging.ERROR,
            breakdown=self.args.breakdown,
            health_interval=self.args.health_interval,
        )
        proc = self.ctx.Process(target=worker_entry, args=(child, cfg), daemon=True)
        proc.start()
        child.close()
        handle = Handle(proc, parent, index)
        self.handles.append(handle)
        return handle

    @staticmethod
    def receive(handle: Handle, timeout: float) -> dict[str, Any]:
        if not handle.conn.poll(timeout):
            raise TimeoutError(f"worker {handle.index} sent nothing within {timeout:.0f} s")
        msg: dict[str, Any] = handle.conn.recv()
        if msg.get("event") == "error":
            raise RuntimeError(f"worker {handle.index} failed:\n{msg['error']}")
        return msg

    def start(self, peers: int, procs: int) -> tuple[float, int]:
        """Start the seed, then the other nodes with at most ``--join-concurrency`` joining at
        once across all workers. Returns the time taken and how many joins failed.

        Joins are paced globally because each one is CPU-heavy (a connection handshake per
        peer contacted, lookups, two puts): with 2 cores and 20 joins at once, RPCs wait
        longer than their timeout, and a node whose bootstrap query times out never fills
        its routing table.
        """
        t0 = time.perf_counter()
        first = self.spawn(0, None)
        msg = self.receive(first, 120)
        boot = msg["addr"]
        self.nodes.append(NodeInfo(msg["node"]["peer_id"], 0, 0, msg["node"]["value"]))
        for i in range(1, procs):
            self.spawn(i, boot)
        # Round-robin placement: node i lives in worker i % procs.
        pending = deque(i % procs for i in range(1, peers))
        by_conn = {h.conn: h for h in self.handles}
        in_flight = 0
        failed = 0
        step = max(1, peers // 10)
        deadline = time.monotonic() + self.args.start_timeout
        while pending or in_flight:
            while pending and in_flight < self.args.join_concurrency:
                self.handles[pending.popleft()].conn.send({"cmd": "join", "bootstrap": boot})
                in_flight += 1
            ready = wait(list(by_conn), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"only {len(self.nodes)} of {peers} nodes joined in time")
            for conn in ready:
                handle = by_conn[conn]  # type: ignore[index]
                msg = self.receive(handle, 1)
                in_flight -= 1
                if msg["event"] == "join_failed":
                    failed += 1
                    print(f"  join failed in worker {handle.index}: {msg['error']}", flush=True)
                    continue
                node = msg["node"]
                self.nodes.append(
                    NodeInfo(node["peer_id"], handle.index, msg["local"], node["value"])
                )
                if len(self.nodes) % step == 0:
                    print(
                        f"  {len(self.nodes)}/{peers} joined after "
                        f"{time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
        return time.perf_counter() - t0, failed

    def broadcast(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        for handle in self.handles:
            handle.conn.send(msg)
        return [self.receive(h, 60) for h in self.handles]

    def run_ops(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run operations with at most ``--concurrency`` in flight across the whole swarm."""
        pending = deque(ops)
        in_flight: dict[int, dict[str, Any]] = {}
        by_conn = {h.conn: h for h in self.handles}
        done: list[dict[str, Any]] = []
        while pending or in_flight:
            while pending and len(in_flight) < self.args.concurrency:
                op = pending.popleft()
                op["id"] = self.next_id
                self.next_id += 1
                in_flight[op["id"]] = op
                self.handles[op["worker"]].conn.send(op)
            ready = wait(list(by_conn), timeout=self.args.request_timeout * 6 + 30)
            if not ready:
                raise TimeoutError(f"{len(in_flight)} operations got no answer")
            for conn in ready:
                msg = self.receive(by_conn[conn], 1)  # type: ignore[index]
                op = in_flight.pop(msg["id"])
                done.append({**op, **msg})
        return done

    def stop(self) -> None:
        """End the worker processes this run started: ask, then terminate, then kill."""
        for handle in self.handles:
            with contextlib.suppress(OSError, ValueError):
                handle.conn.send({"cmd": "exit"})
        deadline = time.monotonic() + 30
        for handle in self.handles:
            handle.proc.join(timeout=max(0.1, deadline - time.monotonic()))
        for handle in self.handles:
            if handle.proc.is_alive():
                handle.proc.terminate()
                handle.proc.join(timeout=5)
            if handle.proc.is_alive():
                handle.proc.kill()
                handle.proc.join(timeout=5)
            handle.conn.close()


def get_ops(swarm: Swarm, count: int, rng: random.Random) -> list[dict[str, Any]]:
    ops = []
    n = len(swarm.nodes)
    for _ in range(count):
        asker, target = rng.sample(range(n), 2)
        a = swarm.nodes[asker]
        ops.append({"cmd": "get", "worker": a.worker, "node": a.local, "target_index": target})
    return ops


def with_expectation(swarm: Swarm, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for op in ops:
        t = swarm.nodes[op["target_index"]]
        out.append({**op, "target": t.peer_id, "value": t.value, "seq": t.seq})
    return out


def put_ops(swarm: Swarm, count: int, rng: random.Random) -> list[dict[str, Any]]:
    chosen = rng.sample(range(len(swarm.nodes)), count)
    return [
        {"cmd": "put", "worker": swarm.nodes[i].worker, "node": swarm.nodes[i].local, "index": i}
        for i in chosen
    ]


def summarise_pass(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r["latency"] * 1000 for r in results if not r["fail"]]
    everything = [r["latency"] * 1000 for r in results]
    reasons: dict[str, int] = defaultdict(int)
    for r in results:
        if r["fail"]:
            reasons[r["fail"]] += 1
    row = {
        "pass": name,
        "ops": len(results),
        "ok": len(ok),
        "success_rate": len(ok) / len(results) if results else math.nan,
        "p50_ms": _report.percentile(everything, 50),
        # A get from a node that knows no server fails in a millisecond; without this the
        # p50 of a partly broken swarm would look better than that of a healthy one.
        "ok_p50_ms": _report.percentile(ok, 50),
        "p90_ms": _report.percentile(everything, 90),
        "p99_ms": _report.percentile(everything, 99),
        "max_ms": max(everything, default=math.nan),
        "failures": dict(reasons),
        "ops_detail": [
            {
                "latency_ms": round(r["latency"] * 1000, 3),
                "fail": r["fail"],
                **({"requester_table": r["requester_table"]} if "requester_table" in r else {}),
                **({"stored": r["stored"]} if "stored" in r else {}),
            }
            for r in results
        ],
    }
    if results and "stored" in results[0]:
        row["stored_median"] = _report.median([float(r["stored"]) for r in results])
    return row


def failure_context(swarm: Swarm, results: list[dict[str, Any]]) -> dict[str, int]:
    """Why failed gets failed: a requester that knows no DHT server, an expected record that
    no node stores (the put missed), an older copy returned although some node holds the
    expected one, or a record that is stored but the lookup did not reach it."""
    failed = [r for r in results if r["fail"]]
    if not failed:
        return {}
    targets = sorted({(r["target"], r["seq"]) for r in failed}, key=lambda t: t[0])
    counts = [0] * len(targets)
    for reply in swarm.broadcast({"cmd": "holders", "targets": targets}):
        counts = [a + b for a, b in zip(counts, reply["counts"], strict=True)]
    held = dict(zip(targets, counts, strict=True))
    context: dict[str, int] = defaultdict(int)
    for r in failed:
        if r["requester_table"] == 0:
            context["requester's routing table empty"] += 1
        elif held[(r["target"], r["seq"])] == 0:
            context["expected record stored nowhere"] += 1
        elif r["fail"].startswith("stale"):
            context["lookup ended on older copies; the newest is stored"] += 1
        else:
            context["stored, but the lookup missed every holder"] += 1
    return dict(context)


def print_pass(row: dict[str, Any]) -> None:
    fails = ", ".join(f"{k}: {v}" for k, v in row["failures"].items()) or "none"
    print(
        f"  {row['pass']:<28} {row['ok']}/{row['ops']} ok, p50 {row['p50_ms']:.1f} ms, "
        f"p90 {row['p90_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; failures: {fails}",
        flush=True,
    )
    for cause, n in row.get("failure_context", {}).items():
        print(f"    {n} x {cause}", flush=True)


def describe_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    tables = [s for st in stats for s in st["table_sizes"]]
    conns = [c for st in stats for c in st["connections"]]
    rss = [st["rss_mib"] for st in stats]
    nodes = [len(st["table_sizes"]) for st in stats]
    return {
        "routing_table": {
            "min": min(tables),
            "p10": _report.percentile(tables, 10),
            "median": _report.median(tables),
            "max": max(tables),
            "nodes_below_5": sum(1 for t in tables if t < 5),
        },
        "connections_per_node": {
            "min": min(conns),
            "median": _report.median(conns),
            "max": max(conns),
        },
        "connections_total": sum(conns),
        "rss_mib_per_proc": {"min": min(rss), "median": _report.median(rss), "max": max(rss)},
        "rss_mib_total": sum(rss),
        "rss_mib_per_node": sum(rss) / max(1, sum(nodes)),
        "peak_rss_mib_max": max(st["peak_rss_mib"] for st in stats),
    }


# As long as DHTNode.maintain's period, so a window always holds one of its rounds.
SETTLE_WINDOW = 5.0


def settle(
    swarm: Swarm, minimum: float, maximum: float
) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """Wait until, for two windows in a row, no routing table changed and the swarm's CPU use
    held steady (at least ``minimum``, at most ``maximum`` seconds). Nodes republish their
    records when their table grows, so measuring earlier would time that catch-up traffic
    and count it as idle background.

    Returns the time waited and the stats at the start and end of the last window.
    """
    t0 = time.monotonic()
    previous = swarm.broadcast({"cmd": "stats"})
    previous_rate: float | None = None
    quiet = 0
    while True:
        time.sleep(SETTLE_WINDOW)
        current = swarm.broadcast({"cmd": "stats"})
        rate = sum(idle_cpu(previous, current))
        same_tables = all(
            a["table_sizes"] == b["table_sizes"] for a, b in zip(previous, current, strict=True)
        )
        steady = previous_rate is not None and abs(rate - previous_rate) <= max(
            0.25 * previous_rate, 0.02 * len(current)
        )
        quiet = quiet + 1 if same_tables and steady else 0
        waited = time.monotonic() - t0
        if (quiet >= 2 and waited >= minimum) or waited >= maximum:
            return waited, previous, current
        previous, previous_rate = current, rate


def idle_cpu(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[float]:
    """Per worker: CPU seconds per wall second while nothing was asked of the swarm."""
    return [
        (a["cpu_s"] - b["cpu_s"]) / max(1e-9, a["wall_s"] - b["wall_s"])
        for b, a in zip(before, after, strict=True)
    ]


def step_table(samples: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
    merged: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for k, v in s.items():
            merged[k].extend(v)
    gets = len(merged.get("get total", [])) or 1
    order = [
        "get total",
        "rpc total",
        "open stream",
        "write request",
        "await reply",
        "close stream",
    ]
    rows = []
    for name in order + sorted(set(merged) - set(order)):
        vals = [v * 1000 for v in merged.get(name, [])]
        if not vals:
            continue
        rows.append(
            {
                "step": name,
                "count": len(vals),
                "per_get": len(vals) / gets,
                "p50_ms": _report.percentile(vals, 50),
                "p90_ms": _report.percentile(vals, 90),
                "mean_ms": sum(vals) / len(vals),
                "ms_per_get": sum(vals) / gets,
            }
        )
    return rows


def print_profile(path: str, top: int) -> None:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(path, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    print(buf.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Put/get latency and success rate of the DHT over N local SwarmNodes."
    )
    parser.add_argument("--peers", type=int, default=40, help="number of nodes (40)")
    parser.add_argument(
        "--procs",
        type=int,
        default=0,
        help=f"worker processes (default: about {NODES_PER_PROC} nodes each)",
    )
    parser.add_argument("--gets", type=int, default=200, help="gets per measured pass (200)")
    parser.add_argument(
        "--puts", type=int, default=0, help="nodes re-publishing per put pass (default: all)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="operations in flight across the swarm (1)"
    )
    parser.add_argument(
        "--join-concurrency",
        type=int,
        default=4,
        help="nodes joining at once across the swarm (4)",
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="minimum seconds to settle after joining (10)"
    )
    parser.add_argument(
        "--settle-max", type=float, default=90.0, help="maximum seconds to settle (90)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=5.0, help="DHT RPC and dial timeout (5)"
    )
    parser.add_argument(
        "--start-timeout", type=float, default=1800.0, help="seconds allowed for joining (1800)"
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="ping every connection every S seconds as deployed nodes do (their setting: "
        "10); default 0 = off, because 20 nodes per core would ping 20x a node's load",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the operation plan (1)")
    parser.add_argument(
        "--breakdown", action="store_true", help="time the steps of every DHT RPC (get passes)"
    )
    parser.add_argument(
        "--profile-worker",
        type=int,
        default=None,
        metavar="K",
        help="run cProfile in worker K during the measured get passes",
    )
    parser.add_argument("--verbose", action="store_true", help="show warnings from workers")
    parser.add_argument("--json", metavar="PATH", help="where to write the results JSON")
    args = parser.parse_args()
    _report.exit_on_sigterm()
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    procs = args.procs or max(1, math.ceil(args.peers / NODES_PER_PROC))
    procs = min(procs, args.peers)
    puts = min(args.puts or args.peers, args.peers)
    if args.profile_worker is not None and not 0 <= args.profile_worker < procs:
        parser.error(f"--profile-worker must be in 0..{procs - 1}")

    rng = random.Random(args.seed)
    swarm = Swarm(args)
    result: dict[str, Any] = {
        "benchmark": "dht_latency",
        "settings": {
            "peers": args.peers,
            "procs": procs,
            "gets": args.gets,
            "puts_per_pass": puts,
            "concurrency": args.concurrency,
            "join_concurrency": args.join_concurrency,
            "settle_min_s": args.settle,
            "settle_max_s": args.settle_max,
            "seed": args.seed,
            "health_interval_s": args.health_interval,
        },
        "environment": _report.environment(),
    }
    profile_paths: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    passes: list[dict[str, Any]] = []
    steps: dict[str, list[dict[str, Any]]] = {}
    try:
        health = f"every {args.health_interval:g} s" if args.health_interval > 0 else "off"
        print(
            f"starting {args.peers} nodes in {procs} processes (connection health checks "
            f"{health}) ...",
            flush=True,
        )
        start_s, join_failures = swarm.start(args.peers, procs)
        print(f"  {len(swarm.nodes)} joined in {start_s:.1f} s", flush=True)
        settle_s, before, after = settle(swarm, args.settle, args.settle_max)
        print(f"  settled after {settle_s:.1f} s", flush=True)
        swarm_stats = describe_stats(after)
        idle = idle_cpu(before, after)
        result["start_s"] = start_s
        result["join_failures"] = join_failures
        result["settle_s"] = settle_s
        result["after_settle"] = swarm_stats
        result["idle_cpu_per_proc"] = idle

        plan = get_ops(swarm, args.gets, rng)
        profiled = args.profile_worker is not None

        def run_pass(name: str, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """Run one pass; its row gets the CPU all workers spent per operation."""
            before = swarm.broadcast({"cmd": "stats"})
            results = swarm.run_ops(ops)
            after = swarm.broadcast({"cmd": "stats"})
            row = summarise_pass(name, results)
            if ops and ops[0]["cmd"] == "get":
                row["failure_context"] = failure_context(swarm, results)
            cpu = sum(a["cpu_s"] - b["cpu_s"] for b, a in zip(before, after, strict=True))
            # What the workers burn anyway (measured while settling) is not the operations'.
            background = sum(
                rate * (a["wall_s"] - b["wall_s"])
                for rate, b, a in zip(idle, before, after, strict=True)
            )
            n = max(1, len(results))
            row["cpu_ms_per_op_raw"] = cpu * 1000 / n
            row["cpu_ms_per_op"] = max(0.0, cpu - background) * 1000 / n
            passes.append(row)
            print_pass(row)
            return results

        def measured_gets(name: str) -> None:
            if args.breakdown:
                swarm.broadcast({"cmd": "steps"})  # drop samples of earlier passes
            if profiled:
                swarm.handles[args.profile_worker].conn.send({"cmd": "profile", "on": True})
                swarm.receive(swarm.handles[args.profile_worker], 30)
            run_pass(name, with_expectation(swarm, plan))
            if profiled:
                folder = Path(args.json).parent if args.json else _report.RESULTS_DIR
                folder.mkdir(parents=True, exist_ok=True)
                path = str(folder / f"dht_latency-{stamp}-worker{args.profile_worker}-{name[:5]}")
                path = path.replace(" ", "_") + ".pstats"
                handle = swarm.handles[args.profile_worker]
                handle.conn.send({"cmd": "profile", "on": False, "path": path})
                swarm.receive(handle, 60)
                profile_paths.append(path)
            if args.breakdown:
                steps[name] = step_table([m["samples"] for m in swarm.broadcast({"cmd": "steps"})])

        print("get passes and put passes (one operation at a time unless --concurrency):")
        run_pass("get warm-up", with_expectation(swarm, plan))
        measured_gets(GET_PASS_NAMES[0])
        for label in ("put, first re-publish", "put, second re-publish"):
            for r in run_pass(label, put_ops(swarm, puts, rng)):
                if not r["fail"]:
                    info = swarm.nodes[r["index"]]
                    info.seq = r["seq"]
                    info.value = r["value"]
        measured_gets(GET_PASS_NAMES[1])
        final = swarm.broadcast({"cmd": "stats"})
        result["at_end"] = describe_stats(final)
    finally:
        swarm.stop()
    result["passes"] = passes
    result["rpc_steps"] = steps

    st = result["after_settle"]
    print()
    print(
        f"{args.peers} peers in {procs} processes on {os.cpu_count()} CPUs; joined in "
        f"{start_s:.1f} s; routing table min/median/max "
        f"{st['routing_table']['min']}/{st['routing_table']['median']:.0f}/"
        f"{st['routing_table']['max']} ({st['routing_table']['nodes_below_5']} nodes know < 5 "
        f"servers); connections per node median "
        f"{st['connections_per_node']['median']:.0f} (total {st['connections_total']})"
    )
    print(
        f"memory: {st['rss_mib_per_proc']['median']:.0f} MiB per process "
        f"(max {st['rss_mib_per_proc']['max']:.0f}), {st['rss_mib_per_node']:.1f} MiB per node, "
        f"{st['rss_mib_total']:.0f} MiB in all; at end max "
        f"{result['at_end']['rss_mib_per_proc']['max']:.0f} MiB per process; idle CPU per "
        f"process median {_report.median(idle) * 100:.1f} % (max {max(idle) * 100:.1f} %)"
    )
    print()
    print(
        _report.format_table(
            [
                "pass",
                "ops",
                "success",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "p50 ok ms",
                "CPU ms/op",
                "above idle",
                "failures",
            ],
            [
                [
                    p["pass"],
                    p["ops"],
                    f"{p['success_rate'] * 100:.1f} %",
                    p["p50_ms"],
                    p["p90_ms"],
                    p["p99_ms"],
                    p["max_ms"],
                    p["ok_p50_ms"],
                    p["cpu_ms_per_op_raw"],
                    p["cpu_ms_per_op"],
                    sum(p["failures"].values()),
                ]
                for p in passes
            ],
        )
    )
    print(
        "latencies include failed operations; p50 ok: successful ones only; CPU ms/op: CPU "
        "time of all workers per operation; above idle: less their background while settled"
    )
    for name, rows in steps.items():
        print(f"\nRPC steps during '{name}' (requester side, all workers):")
        print(
            _report.format_table(
                ["step", "count", "per get", "p50 ms", "p90 ms", "mean ms", "ms per get"],
                [
                    [
                        r["step"],
                        r["count"],
                        r["per_get"],
                        r["p50_ms"],
                        r["p90_ms"],
                        r["mean_ms"],
                        r["ms_per_get"],
                    ]
                    for r in rows
                ],
            )
        )
    if profile_paths:
        result["profiles"] = profile_paths
        print(f"\ncProfile of worker {args.profile_worker} during get A ({profile_paths[0]}):")
        print_profile(profile_paths[0], 25)
    out = _report.write_json("dht_latency", result, args.json)
    print(f"\nresults written to {out}")
    measured = [p for p in passes if p["pass"] in GET_PASS_NAMES]
    return 0 if all(p["ok"] == p["ops"] for p in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
