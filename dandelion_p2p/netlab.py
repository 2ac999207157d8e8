"""A network lab made of Linux network namespaces, for tests and benchmarks.

Topology::

    public host ──┐
    public host ──┤ br0 in the "internet" namespace (10.200.0.0/16)
    router wan0 ──┘
    router lan0 ─── eth0 of a private host (10.201.<k>.0/24, default route via the router)

Routers masquerade their LAN behind ``wan0`` and filter like a home NAT: the forward chain drops
by default and accepts established/related flows and LAN-to-WAN; unsolicited inbound traffic to
the router itself is dropped (or, with ``answer_with_rst=True``, answered with a TCP RST / ICMP
port unreachable, which is what some real NATs do and what breaks TCP hole punching).

Every router leaves empty hook chains for port-mapping daemons, in the ``inet`` family because
miniupnpd's nftables backend only manages ``inet`` tables:

* ``table inet nat``: ``portmap_prerouting`` (DNAT rules), ``portmap_postrouting``;
* ``table inet filter``: ``portmap_forward`` (accept rules for the forwarded flows).

Every veth pair is created directly between two lab namespaces, so the root namespace's
interfaces, routes and firewall are never touched. Namespace names are ``dl<pid>x<lab>-<node>``
(pid and counters in base 36), at most 15 characters. Teardown always runs: on ``close()``, on
leaving the ``with`` block, at interpreter exit, and on SIGTERM/SIGHUP. Namespaces left behind by
a lab whose process was killed outright are swept when the next lab starts.

Needs root, ``ip`` (iproute2), ``nft`` and ``tc``. Use ``netlab_available()`` to decide whether
to skip.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import IO, Any

from dandelion_p2p.errors import ConfigError

__all__ = [
    "Host",
    "NatRouter",
    "NetLab",
    "netlab_available",
    "netlab_unavailable_reason",
    "sweep_stale_namespaces",
]

INTERNET_NET = ipaddress.IPv4Network("10.200.0.0/16")
LAN_NET_TEMPLATE = "10.201.{k}.0/24"
MAX_ROUTERS = 250

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_OURS_RE = re.compile(r"^dl([0-9a-z]+)x([0-9a-z]+)-[0-9a-z]+$")
_COMMAND_TIMEOUT = 20.0
_TERMINATE_GRACE = 2.0

_labs: weakref.WeakSet[NetLab] = weakref.WeakSet()
_lab_counter = itertools.count(1)
_hooks_installed = False
_hooks_lock = threading.Lock()


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _run(args: Sequence[str], *, check: bool = True, input: str | None = None,
         timeout: float = _COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)!s} exited with {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def netlab_unavailable_reason() -> str | None:
    """Why a lab cannot be built here, or None when it can (probes by creating a namespace)."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"dl{_b36(os.getpid())}x0-probe"
    try:
        made = _run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        nft = _run(["ip", "netns", "exec", probe, "nft", "list", "ruleset"], check=False)
        if nft.returncode != 0:
            return f"nftables does not work in a namespace: {nft.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"probing failed: {exc}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return None


def netlab_available() -> bool:
    """True when this process can build a lab (root, ip, nft, tc, and namespaces work)."""
    return netlab_unavailable_reason() is None


def _mbit_ok(value: float | None, what: str) -> None:
    if value is not None and not 0.01 <= value <= 100_000:
        raise ConfigError(f"{what} must be between 0.01 and 100000 Mbit/s, got {value}")


@dataclass(eq=False)
class Host:
    """A namespace with one address; run processes in it with ``popen``/``run``."""

    lab: NetLab
    name: str
    netns: str
    ip: str
    # Interfaces whose egress is this host's uplink / downlink, as (namespace, device).
    _up_dev: tuple[str, str] = field(repr=False)
    _down_dev: tuple[str, str] = field(repr=False)

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` prefixed so that they run inside this namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside the namespace; the lab terminates it at teardown.

        Keyword arguments go to ``subprocess.Popen``. The process gets its own session so that
        teardown can signal its whole process group.
        """
        kwargs.setdefault("start_new_session", True)
        return self.lab._track(subprocess.Popen(self.command(args), **kwargs))

    def run(self, args: Sequence[str], *, timeout: float = 30.0, check: bool = True,
            input: str | bytes | None = None,
            text: bool = True) -> subprocess.CompletedProcess[Any]:
        """Run ``args`` to completion inside the namespace and capture its output.

        Raises ``subprocess.TimeoutExpired`` (after killing it) or, with ``check``,
        ``subprocess.CalledProcessError``.
        """
        proc = self.popen(args, stdin=subprocess.PIPE if input is not None else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_process(proc)
            raise
        finally:
            self.lab._untrack(proc)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(args), out, err)
        return subprocess.CompletedProcess(list(args), proc.returncode, out, err)

    def set_bandwidth(self, up_mbit: float | None = None, down_mbit: float | None = None) -> None:
        """Cap this host's link (None removes a cap): uplink with tbf, downlink with htb."""
        _mbit_ok(up_mbit, "up_mbit")
        _mbit_ok(down_mbit, "down_mbit")
        up_ns, up_dev = self._up_dev
        down_ns, down_dev = self._down_dev
        _run(["ip", "netns", "exec", up_ns, "tc", "qdisc", "del", "dev", up_dev, "root"],
             check=False)
        _run(["ip", "netns", "exec", down_ns, "tc", "qdisc", "del", "dev", down_dev, "root"],
             check=False)
        if up_mbit is not None:
            rate_bytes = up_mbit * 1e6 / 8
            # 20 ms worth of data, but not so little that tbf starves on timer granularity.
            burst = max(32 * 1024, int(rate_bytes / 50))
            _run(["ip", "netns", "exec", up_ns, "tc", "qdisc", "add", "dev", up_dev, "root",
                  "tbf", "rate", f"{up_mbit}mbit", "burst", str(burst), "latency", "50ms"])
        if down_mbit is not None:
            rate_bytes = down_mbit * 1e6 / 8
            quantum = max(1514, min(60000, int(rate_bytes / 10)))
            base = ["ip", "netns", "exec", down_ns, "tc"]
            _run([*base, "qdisc", "add", "dev", down_dev, "root", "handle", "1:", "htb",
                  "default", "10"])
            _run([*base, "class", "add", "dev", down_dev, "parent", "1:", "classid", "1:10",
                  "htb", "rate", f"{down_mbit}mbit", "ceil", f"{down_mbit}mbit",
                  "quantum", str(quantum)])


@dataclass(eq=False)
class NatRouter:
    """A NAT router namespace: ``wan0`` on the internet bridge, ``lan0`` to ``host``."""

    lab: NetLab
    name: str
    netns: str
    wan_ip: str
    lan_ip: str
    lan_net: str
    answer_with_rst: bool
    host: Host

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the router namespace (a gateway daemon, say)."""
        kwargs.setdefault("start_new_session", True)
        return self.lab._track(subprocess.Popen(self.command(args), **kwargs))

    def nft(self, script: str) -> str:
        """Apply an nft script inside the router namespace; returns nft's output."""
        return _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=script).stdout

    def ruleset(self) -> str:
        return _run(["ip", "netns", "exec", self.netns, "nft", "list", "ruleset"]).stdout


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, then SIGKILL what is left; reaps the child."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, _TERMINATE_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # Not a group leader we own (start_new_session was overridden): signal the child.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_namespace_pids(netns: str) -> None:
    """Kill what still runs inside a namespace of ours (children that left their group)."""
    listed = _run(["ip", "netns", "pids", netns], check=False)
    pids = [int(p) for p in listed.stdout.split() if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        pids = alive
        for _ in range(20):
            still = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
            if not still:
                return
            threading.Event().wait(0.05)


def _delete_namespace(netns: str) -> None:
    _kill_namespace_pids(netns)
    _run(["ip", "netns", "delete", netns], check=False)


def sweep_stale_namespaces() -> list[str]:
    """Delete lab namespaces whose creating process no longer exists; returns their names."""
    listed = _run(["ip", "netns", "list"], check=False)
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _OURS_RE.match(name)
        if not match:
            continue
        pid = int(match.group(1), 36)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete_namespace(name)
        removed.append(name)
    return removed


def _close_all_labs() -> None:
    for lab in list(_labs):
        lab.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _close_all_labs()
    # Re-deliver with the default action so the exit status still says "killed by signal".
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_exit_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_close_all_labs)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # Only take over signals nobody else handles, so we never hide someone's handler.
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_signal)


class NetLab:
    """Builds namespaces on demand and removes all of them (and their processes) on close.

    Use as a context manager::

        with NetLab() as lab:
            pub = lab.add_public_host("server")
            nat = lab.add_nat("home", up_mbit=20, down_mbit=20)
            nat.host.run(["ping", "-c1", pub.ip])
    """

    def __init__(self) -> None:
        _install_exit_hooks()
        sweep_stale_namespaces()
        self.prefix = f"dl{_b36(os.getpid())}x{_b36(next(_lab_counter))}-"
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._node_counter = itertools.count(1)
        self._inet_hosts = INTERNET_NET.hosts()
        self._router_count = 0
        self._names: set[str] = set()
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, NatRouter] = {}
        self.closed = False
        _labs.add(self)
        try:
            self.internet = self._new_namespace("i")
            self._ns_run(self.internet, ["ip", "link", "add", "br0", "type", "bridge"])
            self._ns_run(self.internet, ["ip", "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- building ---------------------------------------------------------------------------

    def _new_namespace(self, kind: str) -> str:
        netns = f"{self.prefix}{kind}" if kind == "i" else \
            f"{self.prefix}{kind}{_b36(next(self._node_counter))}"
        if len(netns) > 15:
            raise RuntimeError(f"namespace name {netns!r} is longer than 15 characters")
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        self._ns_run(netns, ["ip", "link", "set", "lo", "up"])
        return netns

    @staticmethod
    def _ns_run(netns: str, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", netns, *args], **kwargs)

    def _check_name(self, name: str) -> None:
        if self.closed:
            raise RuntimeError("the lab is closed")
        if not _NAME_RE.match(name):
            raise ConfigError(f"node name {name!r} must match {_NAME_RE.pattern}")
        if name in self._names:
            raise ConfigError(f"a node named {name!r} already exists in this lab")

    def _next_internet_ip(self) -> str:
        try:
            return str(next(self._inet_hosts))
        except StopIteration:
            raise RuntimeError("the lab's internet subnet is full") from None

    def _attach_to_internet(self, netns: str, dev: str, ip: str) -> str:
        """veth from the bridge to ``dev`` in ``netns``; returns the bridge-side port name."""
        port = f"p{_b36(next(self._node_counter))}"
        self._ns_run(self.internet, ["ip", "link", "add", port, "type", "veth", "peer", "name",
                                     dev, "netns", netns])
        self._ns_run(self.internet, ["ip", "link", "set", port, "master", "br0", "up"])
        self._ns_run(netns, ["ip", "addr", "add", f"{ip}/{INTERNET_NET.prefixlen}", "dev", dev])
        self._ns_run(netns, ["ip", "link", "set", dev, "up"])
        return port

    def add_public_host(self, name: str, *, up_mbit: float | None = None,
                        down_mbit: float | None = None) -> Host:
        """A host with an address on the internet bridge, reachable by everyone."""
        self._check_name(name)
        _mbit_ok(up_mbit, "up_mbit")
        _mbit_ok(down_mbit, "down_mbit")
        netns = self._new_namespace("h")
        ip = self._next_internet_ip()
        port = self._attach_to_internet(netns, "eth0", ip)
        self._names.add(name)
        host = Host(self, name, netns, ip, _up_dev=(netns, "eth0"), _down_dev=(self.internet, port))
        self.hosts[name] = host
        if up_mbit is not None or down_mbit is not None:
            host.set_bandwidth(up_mbit, down_mbit)
        return host

    def add_public_address(self, host: Host) -> str:
        """Give a public host one more internet address (a STUN server needs two)."""
        if host.lab is not self or host._up_dev[0] != host.netns:
            raise ConfigError(f"{host.name!r} is not a public host of this lab")
        ip = self._next_internet_ip()
        self._ns_run(host.netns, ["ip", "addr", "add", f"{ip}/{INTERNET_NET.prefixlen}",
                                  "dev", "eth0"])
        return ip

    def add_nat(self, name: str, *, answer_with_rst: bool = False, up_mbit: float | None = None,
                down_mbit: float | None = None) -> NatRouter:
        """A NAT router plus the private host behind it (``router.host``, named ``name``).

        Bandwidth caps apply to the router's WAN uplink and to its LAN link towards the host.
        """
        self._check_name(name)
        _mbit_ok(up_mbit, "up_mbit")
        _mbit_ok(down_mbit, "down_mbit")
        if self._router_count >= MAX_ROUTERS:
            raise RuntimeError(f"a lab holds at most {MAX_ROUTERS} routers")
        self._router_count += 1
        lan = ipaddress.IPv4Network(LAN_NET_TEMPLATE.format(k=self._router_count))
        lan_ip, host_ip = (str(a) for a in itertools.islice(lan.hosts(), 2))
        router_ns = self._new_namespace("r")
        host_ns = self._new_namespace("n")
        wan_ip = self._next_internet_ip()
        self._attach_to_internet(router_ns, "wan0", wan_ip)
        self._ns_run(router_ns, ["ip", "link", "add", "lan0", "type", "veth", "peer", "name",
                                 "eth0", "netns", host_ns])
        self._ns_run(router_ns, ["ip", "addr", "add", f"{lan_ip}/{lan.prefixlen}", "dev", "lan0"])
        self._ns_run(router_ns, ["ip", "link", "set", "lan0", "up"])
        self._ns_run(host_ns, ["ip", "addr", "add", f"{host_ip}/{lan.prefixlen}", "dev", "eth0"])
        self._ns_run(host_ns, ["ip", "link", "set", "eth0", "up"])
        self._ns_run(host_ns, ["ip", "route", "add", "default", "via", lan_ip])
        self._ns_run(router_ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        _run(["ip", "netns", "exec", router_ns, "nft", "-f", "-"],
             input=_router_ruleset(str(lan), answer_with_rst))
        self._names.add(name)
        host = Host(self, name, host_ns, host_ip, _up_dev=(router_ns, "wan0"),
                    _down_dev=(router_ns, "lan0"))
        router = NatRouter(self, name, router_ns, wan_ip, lan_ip, str(lan), answer_with_rst, host)
        self.hosts[name] = host
        self.routers[name] = router
        if up_mbit is not None or down_mbit is not None:
            host.set_bandwidth(up_mbit, down_mbit)
        return router

    # -- processes and teardown ---------------------------------------------------------------

    def _track(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        if self.closed:
            _stop_process(proc)
            raise RuntimeError("the lab is closed")
        self._processes.append(proc)
        return proc

    def _untrack(self, proc: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._processes.remove(proc)

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes started through this lab that have not been reaped."""
        return [p.pid for p in self._processes if p.poll() is None]

    def close(self) -> None:
        """Stop every tracked process, then delete every namespace. Idempotent."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for proc in reversed(self._processes):
            try:
                _stop_process(proc)
            except Exception as exc:
                errors.append(f"pid {proc.pid}: {exc}")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                _close_quietly(stream)
        self._processes.clear()
        for netns in reversed(self._namespaces):
            try:
                _delete_namespace(netns)
            except Exception as exc:
                errors.append(f"{netns}: {exc}")
        self._namespaces.clear()
        _labs.discard(self)
        if errors:
            raise RuntimeError("lab teardown was incomplete: " + "; ".join(errors))


def _close_quietly(stream: IO[Any] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()


def _router_ruleset(lan_net: str, answer_with_rst: bool) -> str:
    if answer_with_rst:
        refuse = (
            '        iifname "wan0" meta l4proto tcp reject with tcp reset\n'
            '        iifname "wan0" reject with icmpx type port-unreachable\n'
        )
    else:
        refuse = '        iifname "wan0" drop\n'
    return f"""
table inet nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump portmap_prerouting
    }}
    chain portmap_prerouting {{
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump portmap_postrouting
        oifname "wan0" ip saddr {lan_net} masquerade
    }}
    chain portmap_postrouting {{
    }}
}}
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
{refuse}    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        jump portmap_forward
    }}
    chain portmap_forward {{
    }}
}}
"""
