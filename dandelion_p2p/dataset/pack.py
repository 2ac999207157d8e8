"""Packing a dataset: check every image, write WebDataset tar chunks named by their content
hash, and a manifest signed by the run owner.

A chunk holds consecutive samples until the next one would push it over the chunk size. Each
sample is stored as ``<key>.<ext>`` (the original image bytes, never re-encoded), ``<key>.txt``
(the caption) and ``<key>.json`` (width, height, origin), where ``key`` is the sample's
zero-padded index in the dataset. Tar headers carry no time, owner or mode of the input, so
the same input always packs to the same bytes and hashes.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES, ChunkDir, chunk_hash
from dandelion_p2p.dataset.manifest import (
    MANIFEST_FILENAME,
    ChunkEntry,
    Manifest,
    load_manifest,
    write_manifest,
)
from dandelion_p2p.dataset.probe import read_header
from dandelion_p2p.dataset.sources import (
    REFUSED_LINK,
    RawSample,
    find_units,
    read_unit,
    relative_origin,
)
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024
MAX_PACK_CHUNK_BYTES = MAX_CHUNK_BYTES - tarfile.RECORDSIZE
"""A closed tar is padded to a whole record; this leaves room for that padding."""
TAR_END_BYTES = 1024
"""The two zero blocks that end a tar."""
REPORT_FILENAME = "pack-report.json"
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}

BROKEN = "broken_image"
MISSING_CAPTION = "missing_caption"
UNREADABLE = "unreadable"
SYMLINK_OUTSIDE = "symlink_outside"
CAPTION_NOT_UTF8 = "caption_not_utf8"
PACKED_ANYWAY = (MISSING_CAPTION, CAPTION_NOT_UTF8)
"""Problems whose sample is packed all the same; every other problem leaves something out."""


@dataclass(frozen=True, slots=True)
class Problem:
    origin: str
    kind: str
    """``broken_image``, ``unreadable`` and ``symlink_outside`` inputs are skipped;
    ``missing_caption`` samples are packed with an empty caption, ``caption_not_utf8`` ones
    with U+FFFD in place of the bad bytes."""
    detail: str


@dataclass
class PackReport:
    samples: int = 0
    chunks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    @property
    def skipped(self) -> int:
        return sum(1 for p in self.problems if p.kind not in PACKED_ANYWAY)

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "counts": self.counts,
            "problems": [
                {"origin": p.origin, "kind": p.kind, "detail": p.detail} for p in self.problems
            ],
        }


@dataclass(frozen=True, slots=True)
class CheckedImage:
    data: bytes
    ext: str
    width: int
    height: int


def check_image(data: bytes) -> CheckedImage:
    """Decode ``data`` fully with Pillow; raises ``ValueError`` saying why it is unusable.

    Unlike the worker's scan, which decodes each file once and remembers it, packing decodes
    every pixel every time: a pack runs once and vouches for its chunks to every peer.
    """
    from PIL import Image

    header = read_header(data)  # the pixel limit, before any decoding
    ext = FORMATS.get(header.format)
    if ext is None:
        raise ValueError(f"format {header.format or 'unknown'} is not one of "
                         f"{', '.join(FORMATS)}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        # verify() checks structure only; decoding every pixel finds truncated data.
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # Pillow raises many unrelated types on bad input
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    return CheckedImage(data, ext, header.width, header.height)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ChunkWriter:
    """Accumulates samples into one tar in memory; ``finish`` names it by its hash."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 - closed in finish()
            fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT
        )
        self.samples = 0

    @staticmethod
    def sample_bytes(image: CheckedImage, caption: str, meta: bytes) -> int:
        # Each member: a 512-byte header and its data padded to 512.
        return sum(512 + -(-n // 512) * 512 for n in (len(image.data), len(caption.encode()),
                                                       len(meta)))

    @property
    def size(self) -> int:
        return self._buffer.tell()

    def add(self, key: str, image: CheckedImage, caption: str, meta: bytes) -> None:
        for name, data in (
            (f"{key}.{image.ext}", image.data),
            (f"{key}.txt", caption.encode()),
            (f"{key}.json", meta),
        ):
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.samples += 1

    def finish(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()


def pack(
    src: Path,
    out: Path,
    identity: Identity,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    follow_symlinks: bool = False,
    on_unit: Callable[[], None] | None = None,
) -> tuple[Manifest, PackReport]:
    """Pack ``src`` into ``out``; returns the signed manifest and a report of every problem.

    Symlinks leading outside ``src`` are reported and left out unless ``follow_symlinks``.
    ``on_unit`` is called after each input file (for a progress bar).

    Raises:
        ConfigError: bad arguments, an unusable ``out``, nothing left to pack, or a source
            that cannot be read at all (such as parquet without pyarrow).
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_PACK_CHUNK_BYTES:
        raise ConfigError(
            f"--chunk-size must be {MIN_CHUNK_BYTES}..{MAX_PACK_CHUNK_BYTES} bytes"
        )
    units = find_units(src, exclude=out, follow_symlinks=follow_symlinks)
    _prepare_out(out)
    if not units:
        raise ConfigError(f"{src}: no images, .tar or .parquet files found")
    store = ChunkDir(out)
    report = PackReport()
    entries: list[ChunkEntry] = []
    writer = ChunkWriter()

    def flush() -> None:
        nonlocal writer
        if writer.samples == 0:
            return
        data = writer.finish()
        name = chunk_hash(data)
        store.write(name, data)
        entries.append(ChunkEntry(name, writer.samples, len(data)))
        report.chunks += 1
        report.bytes += len(data)
        writer = ChunkWriter()

    for unit in units:
        if unit.kind == REFUSED_LINK:
            origin = relative_origin(unit.path, src)
            report.problems.append(Problem(origin, SYMLINK_OUTSIDE, unit.detail))
            log.info("skipped %s: %s", origin, unit.detail)
        for raw in read_unit(unit, src):
            accepted = _accept(raw, report)
            if accepted is None:
                continue
            image, caption = accepted
            key = f"{report.samples:09d}"
            meta = json.dumps(
                {"width": image.width, "height": image.height, "origin": raw.origin},
                sort_keys=True,
            ).encode()
            needed = ChunkWriter.sample_bytes(image, caption, meta)
            if writer.samples and closed_tar_size(writer.size + needed) > chunk_bytes:
                flush()
            writer.add(key, image, caption, meta)
            report.samples += 1
        if on_unit is not None:
            on_unit()
    flush()
    if not entries:
        raise ConfigError(f"{src}: no usable samples ({len(report.problems)} problems)")
    manifest = Manifest(owner=identity.peer_id.to_base58(), chunks=tuple(entries),
                        skipped={k: v for k, v in report.counts.items()})
    write_manifest(out, manifest, identity)
    (out / REPORT_FILENAME).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    keep = {c.hash for c in entries}
    for stale in set(store.names()) - keep:
        store.remove(stale)
    return manifest, report


def closed_tar_size(members_bytes: int) -> int:
    """Bytes of a tar whose members take ``members_bytes``, once closed (end blocks and
    padding to a whole record)."""
    record = tarfile.RECORDSIZE
    return -(-(members_bytes + TAR_END_BYTES) // record) * record


def _accept(raw: RawSample, report: PackReport) -> tuple[CheckedImage, str] | None:
    if raw.image is None:
        report.problems.append(Problem(raw.origin, UNREADABLE, raw.problem))
        log.info("skipped %s: %s", raw.origin, raw.problem)
        return None
    try:
        image = check_image(raw.image)
    except ValueError as exc:
        report.problems.append(Problem(raw.origin, BROKEN, str(exc)))
        log.info("skipped broken image %s: %s", raw.origin, exc)
        return None
    if raw.caption is None:
        report.problems.append(
            Problem(raw.origin, MISSING_CAPTION, "no caption; packed with an empty caption")
        )
        log.info("%s has no caption; packed with an empty caption", raw.origin)
        return image, ""
    if raw.caption_problem:
        report.problems.append(Problem(raw.origin, CAPTION_NOT_UTF8, raw.caption_problem))
        log.info("caption of %s: %s", raw.origin, raw.caption_problem)
    return image, raw.caption


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_FILENAME).is_file():
            raise ConfigError(f"{out} is not empty and holds no earlier pack; choose a new folder")
        try:
            load_manifest(out)
        except ConfigError as exc:
            raise ConfigError(f"{out} holds an earlier pack that is not valid: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
