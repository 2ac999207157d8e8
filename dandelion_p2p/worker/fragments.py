"""Which part of the vector a local-steps round averages, and when rounds happen.

With ``sync.fragments = F`` (streaming, always overlapped) the flat vector is cut into F
contiguous fragments of nearly equal size, and a round happens every H / F steps instead of
every H. Round k averages fragment k mod F only: each fragment is synced every H steps, over
the H steps since its own last sync, and the fragments take turns on a staggered schedule.
The bytes per H steps are those of one whole-vector round, but each round carries 1/F of
them, so the peak bandwidth and the daemon's per-round memory are cut by F, and each
fragment's average arrives H / F steps after its boundary instead of H.

Peers agree on all of it without talking: the round number is the global step over the
interval, and the fragment is a function of the round and the run config. With F = 1 a round
is the whole vector every H steps, as without streaming.
"""

from __future__ import annotations

from dandelion_p2p.runconfig.schema import RunConfig


def interval(config: RunConfig) -> int:
    """Global steps between two local-steps rounds: H / F."""
    return config.sync.local_steps // config.sync.fragments


def fragment_of(config: RunConfig, round_: int) -> int:
    """The fragment round ``round_`` averages."""
    return round_ % config.sync.fragments


def span(fragments: int, fragment: int, elements: int) -> tuple[int, int]:
    """[start, stop) of ``fragment`` of ``fragments`` in a vector of ``elements``: the first
    ``elements % fragments`` fragments hold one element more."""
    if not 0 <= fragment < fragments:
        raise ValueError(f"fragment {fragment} of {fragments}")
    base, extra = divmod(elements, fragments)
    start = fragment * base + min(fragment, extra)
    return start, start + base + (1 if fragment < extra else 0)


def round_span(config: RunConfig, round_: int, elements: int) -> tuple[int, int]:
    """[start, stop) of the elements round ``round_`` averages."""
    return span(config.sync.fragments, fragment_of(config, round_), elements)


def named_span(config: RunConfig, span: tuple[int, int]) -> tuple[int, int] | None:
    """The span a round names on the wire and in the sync log: none without streaming, where
    a round is the whole vector, as before fragments existed."""
    return span if config.sync.fragments > 1 else None
