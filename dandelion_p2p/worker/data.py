"""Training samples from a local folder: images with captions beside them (kohya layout:
``photo.png`` + ``photo.txt`` or ``photo.caption``) and WebDataset tar shards as the dataset
packer writes them (``<key>.jpg|png|webp`` + ``<key>.txt`` per sample).

A sample is remembered by where its bytes are (a file, or an offset inside a tar) and by the
hash of those bytes, which keys the latent cache. A broken image or a missing caption is
reported by name and the scan goes on. What a scan shares with ``dataset pack`` lives in
``dandelion_p2p.dataset``: the walk and its symlink policy (``walk.py``), the header check and
pixel limit (``probe.py``), caption reading (``captions.py``).

Each image is read, hashed and decoded once (a JPEG at 1/8 scale, enough to find a truncated
file before it can stop training); with a cache file (``scan_cache.py``) a later scan takes
all that from the cache for every file whose size and mtime are unchanged, and reads only the
captions.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blake3
from PIL import Image

from dandelion_p2p.dataset.captions import (
    CAPTION_EXTENSIONS,
    MAX_CAPTION_BYTES,
    decode_caption,
    read_caption_file,
)
from dandelion_p2p.dataset.probe import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_BYTES,
    OverPixelLimit,
    read_and_decode,
)
from dandelion_p2p.dataset.walk import RefusedLink, list_folder, path_order
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.worker.scan_cache import ImageFacts, ScanCache

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = IMAGE_EXTENSIONS
CAPTION_SUFFIXES = CAPTION_EXTENSIONS
FOLLOW_HINT = "set follow_symlinks in the local settings to train on it"


@dataclass(frozen=True, slots=True)
class Sample:
    key: str
    """Where the sample came from, for messages: a path, or ``shard.tar:key``."""
    path: Path
    offset: int
    """Byte offset of the image inside ``path`` (0 for a plain image file)."""
    size: int
    content_hash: str
    caption: str
    width: int
    height: int
    subset: int = 0
    """Index into the feed's subset table (``kohya_dataset.py``); 0: in no subset."""

    def read_bytes(self) -> bytes:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def load_image(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.read_bytes()))
        image.load()
        return image.convert("RGB")


@dataclass
class ScanReport:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One line per image (or refused symlink) left out, with the reason."""
    caption_problems: list[str] = field(default_factory=list)
    """One line per caption that is not valid UTF-8 or cannot be read; its image trains."""
    empty_captions: int = 0


def examine(data: bytes) -> ImageFacts:
    """Hash, size and usability of one image's bytes: the header first (the pixel limit
    refuses an image before anything decodes it), then one decode."""
    digest = blake3.blake3(data).hexdigest()
    try:
        header = read_and_decode(data)
    except OverPixelLimit as exc:
        return ImageFacts(digest, 0, 0, str(exc))
    except ValueError as exc:
        return ImageFacts(digest, 0, 0, f"not a readable image ({exc})")
    return ImageFacts(digest, header.width, header.height)


class _Scan:
    """One scan: the report it fills and the cache it consults (None: no cache)."""

    def __init__(self, cache: ScanCache | None) -> None:
        self.report = ScanReport()
        self.cache = cache

    def facts(self, path: str, offset: int, stat: os.stat_result,
              read: Callable[[], bytes]) -> ImageFacts:
        known = self.cache.get(path, offset, stat) if self.cache is not None else None
        if known is None:
            known = examine(read())
            if self.cache is not None:
                self.cache.put(path, offset, stat, known)
        return known

    def add(self, where: str, path: Path, offset: int, size: int, facts: ImageFacts,
            caption: str) -> None:
        if facts.problem:
            self.report.skipped.append(f"{where}: {facts.problem}")
            return
        self.report.samples.append(Sample(where, path, offset, size, facts.content_hash,
                                          caption, facts.width, facts.height))

    def folder_image(self, path: str, caption_path: str | None) -> None:
        try:
            stat = os.stat(path)
            if stat.st_size > MAX_IMAGE_BYTES:
                self.report.skipped.append(f"{path}: larger than {MAX_IMAGE_BYTES} bytes")
                return
            facts = self.facts(path, 0, stat, lambda: _read_file(path))
        except OSError as exc:
            self.report.skipped.append(f"{path}: unreadable ({exc.strerror})")
            return
        self.add(path, Path(path), 0, stat.st_size, facts, self.folder_caption(caption_path))

    def folder_caption(self, path: str | None) -> str:
        if path is None:
            return ""
        try:
            caption = read_caption_file(path)
        except OSError as exc:
            self.report.caption_problems.append(
                f"{path}: unreadable ({exc.strerror}); its image trains with an empty caption")
            return ""
        if caption.problem:
            self.report.caption_problems.append(f"{path}: {caption.problem}")
        return caption.text

    def shard(self, shard: Path) -> None:
        images: dict[str, tarfile.TarInfo] = {}
        captions: dict[str, tarfile.TarInfo] = {}
        try:
            stat = shard.stat()
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, dot, ext = member.name.rpartition(".")
                    if not dot:
                        continue
                    if "." + ext.lower() in IMAGE_SUFFIXES:
                        images[stem] = member
                    elif "." + ext.lower() in CAPTION_SUFFIXES:
                        captions[stem] = member
            with shard.open("rb") as raw:
                for stem, member in images.items():
                    self.shard_member(shard, stat, raw, member, captions.get(stem))
        except (tarfile.TarError, OSError) as exc:
            self.report.skipped.append(f"{shard}: not a readable tar shard ({exc})")

    def shard_member(self, shard: Path, stat: os.stat_result, raw: BinaryIO,
                     member: tarfile.TarInfo, caption_member: tarfile.TarInfo | None) -> None:
        where = f"{shard}:{member.name}"
        if member.size > MAX_IMAGE_BYTES:
            self.report.skipped.append(f"{where}: larger than {MAX_IMAGE_BYTES} bytes")
            return

        def read() -> bytes:
            raw.seek(member.offset_data)
            return raw.read(member.size)

        facts = self.facts(str(shard), member.offset_data, stat, read)
        text = ""
        if caption_member is not None:
            raw.seek(caption_member.offset_data)
            caption = decode_caption(raw.read(min(caption_member.size, MAX_CAPTION_BYTES + 1)))
            if caption.problem:
                self.report.caption_problems.append(
                    f"{shard}:{caption_member.name}: {caption.problem}")
            text = caption.text
        self.add(where, shard, member.offset_data, member.size, facts, text)

    def finish(self) -> ScanReport:
        """Log what was skipped or misread, count the empty captions, keep the cache."""
        report = self.report
        for line in report.skipped:
            log.warning("skipping %s", line)
        for line in report.caption_problems:
            log.warning("caption %s", line)
        report.empty_captions = sum(1 for s in report.samples if not s.caption)
        if self.cache is not None:
            self.cache.save()
        return report


def scan_shard(shard: Path) -> ScanReport:
    """The samples of one WebDataset tar shard, e.g. a chunk leased from a dataset server."""
    one = _Scan(None)
    one.shard(Path(shard))
    return one.finish()


def scan(root: Path, *, follow_symlinks: bool = False,
         cache_file: Path | None = None) -> ScanReport:
    """Every sample under ``root`` (image files and ``*.tar`` shards, recursively).

    Symlinks leading outside ``root`` are skipped and named unless ``follow_symlinks``;
    ``cache_file`` keeps what was learned about each image for the next scan.

    Raises:
        ConfigError: ``root`` is missing or holds no usable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"training data folder {root} does not exist or is not a folder")
    # Hidden files and folders (.ipynb_checkpoints, editor backups) are skipped, as the
    # packer skips them: a folder trains on what its packed dataset would hold.
    listing = list_folder(root, follow_symlinks=follow_symlinks, skip_hidden=True)
    files = listing.files
    present = set(files)
    this = _Scan(ScanCache(cache_file) if cache_file is not None else None)
    for link in listing.refused:
        if _wanted(link):
            this.report.skipped.append(f"{link.path}: {link.explain(FOLLOW_HINT)}")
    images = (f for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
    for path in sorted(images, key=path_order):
        this.folder_image(path, _caption_beside(path, present))
    for shard in sorted((f for f in files if f.endswith(".tar")), key=path_order):
        this.shard(Path(shard))
    report = this.finish()
    if report.empty_captions:
        log.warning(
            "%d images have no caption (no .txt or .caption beside them, or an empty one); "
            "they train with an empty prompt", report.empty_captions
        )
    if not report.samples:
        raise ConfigError(
            f"no usable images in {root} (looked for {', '.join(IMAGE_SUFFIXES)} files and "
            f".tar shards; {len(report.skipped)} skipped)"
        )
    log.info("found %d images in %s", len(report.samples), root)
    return report


def _wanted(link: RefusedLink) -> bool:
    """A refused link worth naming: a folder, or a file the scan would have read."""
    suffix = link.path.suffix.lower()
    return (link.is_dir or suffix in IMAGE_SUFFIXES or suffix in CAPTION_SUFFIXES
            or link.path.suffix == ".tar")


def _caption_beside(image: str, present: set[str]) -> str | None:
    stem = os.path.splitext(image)[0]
    return next((stem + s for s in CAPTION_SUFFIXES if stem + s in present), None)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
