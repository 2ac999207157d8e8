"""Which version of a run's config is in force at which global step (sans-IO).

Every published version carries the global step from which it applies (``effective_step``).
The version in force for a round is the newest known version whose effective step is at or
before the round's first global step. Every peer computes this from the same signed records,
so all peers train a round under the same version without talking; a peer that has not yet
learned a version trains under an older one, and because the version is part of the
averaging group's identity it cannot average with the others until it catches up.

A version may change only what a running trainer can change between two rounds
(``LIVE_KEYS``); one that changes anything else (the model, the method, the resolution, ...)
is refused: by the publisher before it is signed, and by every reader against the version
before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

from dandelion_p2p.runconfig.schema import RunConfig

MAX_KNOWN_VERSIONS = 8
"""Versions a timeline keeps; the oldest go first (one superseded eight times over is never
in force again for a peer that is training)."""

LIVE_KEYS = frozenset({
    "training.max_steps", "training.min_snr_gamma", "training.noise_offset",
    "training.caption_dropout", "training.ema_decay", "training.sample_every",
    "training.sample_prompts", "training.sample_steps",
    "optimizer.lr", "optimizer.weight_decay", "optimizer.beta1", "optimizer.beta2",
    "optimizer.eps", "optimizer.max_grad_norm",
    "optimizer.unet_lr", "optimizer.text_encoder_lr", "optimizer.d_coef",
    "schedule.name", "schedule.warmup_steps", "schedule.min_lr_ratio", "schedule.num_cycles",
    "schedule.power",
    "sync.local_steps", "sync.outer_lr", "sync.outer_momentum", "sync.outer_step_alone",
    "sync.target_batch",
    "averaging.codec", "averaging.aggregation", "averaging.min_group", "averaging.max_group",
    "averaging.chunk_timeout", "averaging.gather_window",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.keep_rounds",
    "dataset.lease_seconds", "dataset.max_leases_per_peer", "dataset.manifest",
    "export.weights", "export.lora_formats", "export.precision",
})
"""Settings a running worker (or its daemon) applies at a round boundary. Everything else
(the model, training method, LoRA shape, resolution and buckets, batch size, seed, EMA on or
off, optimizer kind, sync mode, and keys added to the schema later) is fixed for the run."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value


def fixed_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """The keys outside ``LIVE_KEYS`` whose value differs between ``old`` and ``new``."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten(old.to_dict(), "", before)
    _flatten(new.to_dict(), "", after)
    return sorted(key for key in before.keys() | after.keys()
                  if key not in LIVE_KEYS and before.get(key) != after.get(key))


def round_up_to(step: int, boundary: int) -> int:
    """The first multiple of ``boundary`` at or after ``step``."""
    return -(-step // boundary) * boundary


def round_boundary(config: RunConfig) -> int:
    """Steps between two sync boundaries under ``config``: H in local-steps mode, else 1."""
    return config.sync.local_steps if config.sync.mode == "local_steps" else 1


class Versioned(Protocol):
    """A version of a run's config: a daemon's ``RunDocument`` or a worker's
    ``ConfigVersion``."""

    @property
    def version(self) -> int: ...

    @property
    def effective_step(self) -> int: ...

    @property
    def toml(self) -> str: ...

    @property
    def config(self) -> RunConfig: ...


V = TypeVar("V", bound=Versioned)


class ConfigTimeline(Generic[V]):
    """The versions of one run's config a peer knows, by version number."""

    def __init__(self, limit: int = MAX_KNOWN_VERSIONS) -> None:
        self.limit = limit
        self._versions: dict[int, V] = {}

    def __iter__(self) -> Iterator[V]:
        return iter(sorted(self._versions.values(), key=lambda v: v.version))

    def __len__(self) -> int:
        return len(self._versions)

    def newest(self) -> V | None:
        return self._versions[max(self._versions)] if self._versions else None

    def get(self, version: int) -> V | None:
        return self._versions.get(version)

    def add(self, entry: V) -> str | None:
        """Take ``entry``; returns why it was refused, or None (taken, or known already).

        A version number already known keeps its first text: the owner's signature makes two
        texts under one number impossible for published versions, and a local file read again
        must not change a running run behind its peers' backs.
        """
        if entry.version in self._versions:
            return None
        older = [v for v in self._versions if v < entry.version]
        newer = [v for v in self._versions if v > entry.version]
        for neighbour in ([max(older)] if older else []) + ([min(newer)] if newer else []):
            changed = fixed_changes(self._versions[neighbour].config, entry.config)
            if changed:
                return (f"it changes {', '.join(changed)} against version {neighbour}; "
                        "a running run can change only what its trainers apply live")
        self._versions[entry.version] = entry
        while len(self._versions) > self.limit:
            del self._versions[min(self._versions)]
        return None

    def in_force(self, step: int) -> V | None:
        """The version for a round whose first global step is ``step``: the newest version
        effective at or before it. When every known version is still to come (a peer that
        joined while the only record in the DHT is a pending version), the oldest known one:
        such a peer trains, but groups with no peer on an earlier version."""
        if not self._versions:
            return None
        effective = [v for v in self._versions.values() if v.effective_step <= step]
        if effective:
            return max(effective, key=lambda v: v.version)
        return self._versions[min(self._versions)]

    def newer_than(self, version: int) -> list[V]:
        return [v for v in self if v.version > version]
