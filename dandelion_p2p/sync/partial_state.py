"""A state downloaded without the files its worker has no use for.

A checkpoint holds more than the swarm's state: the inner optimizer's moments, the loss
scaler, the random generators, the EMA and the progress of the peer that wrote it. A worker
that averages with an outer optimizer joins from that optimizer's state alone
(``outer.safetensors``: the global weights and the outer momentum, the same bytes on every
peer): it sets its weights to the global ones when it joins and trains on with its own inner
optimizer and generators. At SD 1.5 size that is 6.9 GB of a checkpoint of about 17 GB, so
the download that decides when a joiner can train is 2.5 times shorter.

The worker names what it can do without (``worker.catch_up``'s ``leave_out``); the download
skips those files and the folder's manifest is rewritten to list only the files it holds,
naming the others under ``left_out``: the worker's checkpoint store then verifies the folder
as it verifies its own. Pure functions: no files, no network.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

from dandelion_p2p.sync.statesync_core import FILE_NAME, MANIFEST, MAX_FILES

MAX_MANIFEST = 1 << 20
"""Largest manifest a download takes: it is parsed and checked against the offer (a
checkpoint's is a few KB)."""


def leave_out_names(value: object) -> frozenset[str]:
    """The file names a worker asked to leave out of a download.

    Raises:
        ValueError: not a list of at most ``MAX_FILES`` plain file names, or the manifest
            among them (a folder without it is no checkpoint).
    """
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise ValueError(f"'leave_out' must be a list of at most {MAX_FILES} file names")
    if not all(isinstance(n, str) and FILE_NAME.fullmatch(n) for n in value):
        raise ValueError("'leave_out' holds something other than a plain file name")
    names = frozenset(value)
    if MANIFEST in names:
        raise ValueError(f"'leave_out' cannot name {MANIFEST}")
    return names


def held_manifest(manifest: bytes, offered: Mapping[str, str],
                  left_out: Collection[str]) -> bytes | None:
    """Check a downloaded checkpoint's ``manifest`` against the files its offer listed
    (``offered``: name to hash, the manifest aside) and return what to keep of it: None when
    nothing was left out (kept as it came), else the manifest listing only the files held,
    the names left out under ``left_out`` with their hashes.

    The offer's hashes are what the files were checked against, and what the joiner's peers
    agreed on; a manifest that lists other files or hashes would have the worker load
    something else (or refuse the folder after the download reported it in).

    Raises:
        ValueError: the bytes are larger than ``MAX_MANIFEST``, are not a manifest (a JSON
            object whose ``files`` maps names to hashes), or list other files or hashes than
            the offer.
    """
    if len(manifest) > MAX_MANIFEST:
        raise ValueError(f"a manifest of {len(manifest)} bytes (at most {MAX_MANIFEST})")
    try:
        data = json.loads(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"the manifest is not JSON: {type(exc).__name__}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ValueError("the manifest lists no files")
    if files != dict(offered):
        raise ValueError("the manifest lists other files or hashes than the offer")
    skipped = {name: files.pop(name) for name in sorted(left_out) if name in files}
    if not skipped:
        return None
    data["left_out"] = skipped
    return json.dumps(data, indent=1, sort_keys=True).encode()
