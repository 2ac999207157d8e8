"""Constants shared by the worker and the daemon's sync service (no torch here).

The control messages themselves travel as methods on the daemon's control socket (see
``protocol/worker.md``); this module names them and bounds their fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig, loads
from dandelion_p2p.runconfig.timeline import Versioned

PROTOCOL_VERSION = 4

HELLO = "worker.hello"
BUFFER = "worker.buffer"
PROGRESS = "worker.progress"
SYNC = "worker.sync"
CATCH_UP = "worker.catch_up"
CATCH_UP_STATUS = "worker.catch_up_status"
FETCH_ROUNDS = "worker.fetch_rounds"

ROUNDS_DIR = "rounds"
"""The folder, beside the worker's checkpoints, of the averaged rounds kept for joiners
(``worker/served_rounds.py`` writes them, ``sync/checkpoints.py`` serves them)."""
ROUND_FILE = re.compile(r"round-(\d{8,})-(\d+)\.bin")
"""A kept round's file: the round, and the members that averaged it."""


def round_file_name(round_: int, members: int) -> str:
    return f"round-{round_:08d}-{members}.bin"


def round_files(folder: Path) -> dict[int, tuple[Path, int]]:
    """The kept rounds' files in ``folder``, round -> (file, members), in round order; none
    when the folder does not exist."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        if m := ROUND_FILE.fullmatch(path.name):
            found[int(m.group(1))] = (path, int(m.group(2)))
    return dict(sorted(found.items()))

RUN_MARKER = "run-id"
"""A file in a worker folder naming the run (its id) whose state the folder holds."""


def work_dir_for(root: Path, name: str, run: str) -> Path:
    """The worker folder of run ``run`` (id), whose config is named ``name``: ``root/name``,
    unless that folder is marked as another run's (another owner's run of the same name),
    then ``root/run``. A folder with no mark is taken as it is (``claim_work_dir`` marks it)."""
    usual = root / name
    try:
        holder = (usual / RUN_MARKER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return usual
    return usual if not run or holder in ("", run) else root / run


def claim_work_dir(folder: Path, run: str) -> None:
    """Mark ``folder`` as run ``run``'s, unless it is marked already."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_MARKER
    if run and not marker.exists():
        marker.write_text(run + "\n", encoding="utf-8")


SAMPLES_DIR = "samples"
"""The folder, beside the worker's checkpoints, of its sample images (``worker/sampling.py``
writes them, the web UI shows them through ``training.samples``)."""
SAMPLE_FILE = re.compile(r"step-(\d{8,})-([a-z]+)-(\d{2})\.png")
"""A sample image: the global step, the weights it was drawn with and the prompt's index."""


def sample_file_name(step: int, weights: str, index: int) -> str:
    return f"step-{step:08d}-{weights}-{index:02d}.png"


def sample_files(folder: Path, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` sample images in ``folder`` (plain files only), newest step
    first: name, step, weights, prompt index and size."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = SAMPLE_FILE.fullmatch(path.name)
        if m and path.is_file() and not path.is_symlink():
            found.append((int(m.group(1)), int(m.group(3)), m.group(2), path))
    found.sort(key=lambda f: (-f[0], f[1]))
    return [{"name": path.name, "step": step, "weights": weights, "prompt": index,
             "bytes": path.stat().st_size} for step, index, weights, path in found[:limit]]


WORKER_STATES = ("starting", "training", "syncing", "stopping", "stopped")
MAX_DETAIL = 2000
MAX_ELEMENTS = 8 * 1024**3 // 4
"""The largest vector the shared buffer holds: 8 GiB of float32 (an SDXL UNet is 10.3 GB in
fp32, so a full SDXL fine-tune syncs in lower precision or as LoRA)."""

MAX_RUN_CONFIGS = 8
"""Config versions one answer carries (each at most a DHT record's 7 KiB of TOML)."""
MAX_RUN_CONFIG_BYTES = 64 * 1024
MAX_STEP = 2**53


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    """A version of the run's config as the worker learns it: in force from global step
    ``effective_step`` (version 0: a local file, in force throughout)."""

    version: int
    effective_step: int
    toml: str
    config: RunConfig


def encode_run_configs(entries: Iterable[Versioned]) -> list[dict[str, Any]]:
    """``run_configs`` for an answer: the newest ``MAX_RUN_CONFIGS`` of ``entries``."""
    wire = [{"version": e.version, "effective_step": e.effective_step, "toml": e.toml}
            for e in sorted(entries, key=lambda e: e.version)]
    return wire[-MAX_RUN_CONFIGS:]


def round_config(params: dict[str, Any]) -> tuple[int, int, int]:
    """From a ``worker.sync`` request: the config version the round was trained under, the
    round's first global step, and the newest version the worker holds.

    Raises:
        ConfigError: a field is missing or out of range.
    """
    return (_bounded_int(params.get("config_version"), "config_version", 0, 2**63),
            _bounded_int(params.get("step"), "step", 0, MAX_STEP),
            _bounded_int(params.get("known_version"), "known_version", 0, 2**63))


def sync_span(params: dict[str, Any], elements: int) -> tuple[int, int] | None:
    """From a ``worker.sync`` request: the [start, stop) of the buffer to average (a
    streaming fragment), or None for the whole buffer.

    Raises:
        ConfigError: the span is malformed or does not lie inside the buffer.
    """
    value = params.get("span")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError("'span' must be [start, stop]")
    start = _bounded_int(value[0], "span start", 0, elements)
    stop = _bounded_int(value[1], "span stop", start + 1, elements + 1)
    return start, stop


def _bounded_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ConfigError(f"{what}: expected an integer in [{low}, {high})")
    return value


def decode_run_configs(value: Any) -> list[ConfigVersion]:
    """The ``run_configs`` of a ``worker.hello`` or ``worker.sync`` answer, validated.

    Raises:
        ConfigError: not a list of at most ``MAX_RUN_CONFIGS`` valid versions.
    """
    if not isinstance(value, list) or len(value) > MAX_RUN_CONFIGS:
        raise ConfigError(f"run_configs: expected a list of at most {MAX_RUN_CONFIGS}")
    found = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"version", "effective_step", "toml"}:
            raise ConfigError("run_configs: each entry is {version, effective_step, toml}")
        toml = item["toml"]
        if not isinstance(toml, str) or len(toml.encode()) > MAX_RUN_CONFIG_BYTES:
            raise ConfigError(f"run_configs: toml must be text of at most "
                              f"{MAX_RUN_CONFIG_BYTES} bytes")
        found.append(ConfigVersion(
            version=_bounded_int(item["version"], "run_configs.version", 0, 2**63),
            effective_step=_bounded_int(item["effective_step"], "run_configs.effective_step",
                                        0, MAX_STEP),
            toml=toml,
            config=loads(toml),
        ))
    return found
