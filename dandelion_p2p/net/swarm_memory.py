"""What a peer remembers of the swarm across restarts: relays and DHT servers it talked to.

A restarted peer whose configured bootstrap peers are all gone would otherwise be alone,
although it knew many live peers seconds before. The memory is a small JSON file in the data
dir, and everything in it is bounded, because strangers decide what goes in:

* only peers we held a direct connection to are remembered, each under the network
  (``networks.network_of``) of the IP that connection came from, not of what it claims;
* at most ``MAX_PER_NETWORK`` peers per network and ``MAX_PEERS`` in all: an attacker needs
  ``MAX_PEERS / MAX_PER_NETWORK`` networks to fill the memory, and then only displaces the
  least recently seen entries;
* at most ``MAX_ADDRS`` direct addresses per peer, each at most ``MAX_ADDR_CHARS`` long;
* entries not seen for ``MAX_AGE`` seconds are forgotten.

No I/O beyond reading and writing the one file; the node feeds it and asks it (``net.recall``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dandelion_p2p.files import write_atomically
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.networks import UNKNOWN_NETWORK

log = logging.getLogger(__name__)

MEMORY_FILENAME = "swarm.json"
FORMAT_VERSION = 1
MAX_PEERS = 64
MAX_PER_NETWORK = 4
MAX_ADDRS = 4
MAX_ADDR_CHARS = 200
MAX_AGE = 14 * 24 * 3600.0
MAX_FILE_BYTES = 256 * 1024
"""Larger than ``MAX_PEERS`` full entries can make the file; a larger file is not ours."""

ROLE_RELAY = "relay"
ROLE_DHT = "dht"
ROLES = frozenset({ROLE_RELAY, ROLE_DHT})
PEER_ID_MAX_BYTES = 64


@dataclass(frozen=True, slots=True)
class Remembered:
    peer_id: bytes
    addrs: tuple[str, ...]
    roles: frozenset[str]
    network: str
    last_seen: float

    def to_json(self) -> dict[str, object]:
        return {
            "peer_id": self.peer_id.hex(),
            "addrs": list(self.addrs),
            "roles": sorted(self.roles),
            "network": self.network,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_json(cls, data: object) -> Remembered:
        """Raises ValueError (or TypeError) for anything but an entry we could have written."""
        if not isinstance(data, dict):
            raise ValueError("an entry must be an object")
        peer_id = bytes.fromhex(str(data["peer_id"]))
        addrs = tuple(str(a) for a in data["addrs"])
        roles = frozenset(str(r) for r in data["roles"])
        network = str(data["network"])
        last_seen = float(data["last_seen"])
        if not 0 < len(peer_id) <= PEER_ID_MAX_BYTES:
            raise ValueError("bad peer id")
        if not roles or not roles <= ROLES:
            raise ValueError(f"bad roles {sorted(roles)}")
        return cls(peer_id, _usable_addrs(addrs), roles, network, last_seen)


def _usable_addrs(addrs: tuple[str, ...]) -> tuple[str, ...]:
    """Direct, well-formed addresses only (a circuit address needs its relay, which is
    remembered on its own), at most ``MAX_ADDRS``."""
    out: list[str] = []
    for addr in addrs:
        if len(addr) > MAX_ADDR_CHARS or maddrs.is_relayed(addr) or maddrs.parse(addr) is None:
            continue
        if addr not in out:
            out.append(addr)
        if len(out) == MAX_ADDRS:
            break
    return tuple(out)


class SwarmMemory:
    """Remembered peers, bounded as the module says. ``now`` is wall-clock time (seconds since
    the epoch): entries outlive the process."""

    def __init__(self) -> None:
        self._peers: dict[bytes, Remembered] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def note(
        self, peer_id: bytes, addrs: tuple[str, ...], role: str, network: str, now: float
    ) -> bool:
        """Remember (or refresh) a peer seen at ``now`` with ``role``, connected to us from
        ``network``. Returns whether it is remembered afterwards."""
        if role not in ROLES or network == UNKNOWN_NETWORK:
            return False
        if not 0 < len(peer_id) <= PEER_ID_MAX_BYTES:
            return False
        usable = _usable_addrs(addrs)
        old = self._peers.pop(peer_id, None)
        if not usable:
            usable = old.addrs if old is not None else ()
        if not usable:
            return False
        roles = frozenset({role}) | (old.roles if old is not None else frozenset())
        entry = Remembered(peer_id, usable, roles, network, now)
        same_network = [p for p in self._peers.values() if p.network == network]
        if len(same_network) >= MAX_PER_NETWORK:
            self._drop_oldest(same_network)
        if len(self._peers) >= MAX_PEERS:
            self._drop_oldest(list(self._peers.values()))
        self._peers[peer_id] = entry
        return True

    def _drop_oldest(self, among: list[Remembered]) -> None:
        oldest = min(among, key=lambda p: p.last_seen)
        del self._peers[oldest.peer_id]

    def forget_old(self, now: float) -> None:
        for peer in [p for p in self._peers.values() if now - p.last_seen > MAX_AGE]:
            del self._peers[peer.peer_id]

    def peers(self, now: float, role: str | None = None) -> list[Remembered]:
        """Live entries (``MAX_AGE``), most recently seen first; relays before others when
        ``role`` is None, as a relay is what a peer behind NAT needs first."""
        self.forget_old(now)
        found = [p for p in self._peers.values() if role is None or role in p.roles]
        return sorted(found, key=lambda p: (ROLE_RELAY not in p.roles, -p.last_seen))

    def to_json(self) -> dict[str, object]:
        return {
            "version": FORMAT_VERSION,
            "peers": [p.to_json() for p in self._peers.values()],
        }

    @classmethod
    def from_json(cls, data: object, now: float) -> SwarmMemory:
        """A memory from what ``to_json`` wrote; entries that do not parse are skipped, and the
        bounds are applied again (the file may have been edited, or written by a build with
        other bounds)."""
        memory = cls()
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            return memory
        raw = data.get("peers")
        if not isinstance(raw, list):
            return memory
        entries: list[Remembered] = []
        for item in raw[: MAX_PEERS * 2]:
            try:
                entries.append(Remembered.from_json(item))
            except (KeyError, TypeError, ValueError):
                continue
        for entry in sorted(entries, key=lambda p: p.last_seen):
            for role in sorted(entry.roles):
                memory.note(entry.peer_id, entry.addrs, role, entry.network, entry.last_seen)
        memory.forget_old(now)
        return memory


def load_memory(path: Path, now: float) -> SwarmMemory:
    """The memory saved at ``path``; an empty one when there is none or it cannot be used
    (forgetting the swarm only costs a slower start, never a refusal to run)."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return SwarmMemory.from_json(json.loads(raw), now)
    except FileNotFoundError:
        pass
    except Exception as exc:
        log.warning("ignoring unreadable swarm memory %s (%s)", path, exc)
    return SwarmMemory()


def save_memory(memory: SwarmMemory, path: Path) -> None:
    """Raises OSError when the data dir cannot be written."""
    write_atomically(path, json.dumps(memory.to_json(), indent=1).encode())
