"""Training samples from a local folder: images with captions beside them (kohya layout:
``photo.png`` + ``photo.txt`` or ``photo.caption``) and WebDataset tar shards as the dataset
packer writes them (``<key>.jpg|png|webp`` + ``<key>.txt`` per sample).

A sample is remembered by where its bytes are (a file, or an offset inside a tar) and by the
hash of those bytes, which keys the latent cache. A broken image or a missing caption is
reported by name and the scan goes on.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
from PIL import Image, UnidentifiedImageError

from dandelion_p2p.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIXES = (".txt", ".caption")
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_CAPTION_BYTES = 64 * 1024
Image.MAX_IMAGE_PIXELS = 16384 * 16384


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
    samples: list[Sample]
    skipped: list[str]
    """One line per image left out, with the reason."""
    empty_captions: int


def _probe(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of a decodable image; raises ValueError with the reason otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from None


def _caption_text(data: bytes, where: str) -> str:
    try:
        return data[:MAX_CAPTION_BYTES].decode("utf-8").strip()
    except UnicodeDecodeError:
        log.warning("%s: caption is not UTF-8; reading it as Latin-1", where)
        return data[:MAX_CAPTION_BYTES].decode("latin-1").strip()


def _folder_images(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path


def _make_sample(key: str, path: Path, offset: int, data: bytes, caption: str) -> Sample:
    width, height = _probe(data, key)
    return Sample(
        key=key,
        path=path,
        offset=offset,
        size=len(data),
        content_hash=blake3.blake3(data).hexdigest(),
        caption=caption,
        width=width,
        height=height,
    )


def _scan_folder_image(path: Path, report: ScanReport) -> None:
    caption = ""
    for suffix in CAPTION_SUFFIXES:
        side = path.with_suffix(suffix)
        if side.is_file():
            caption = _caption_text(side.read_bytes(), str(side))
            break
    if path.stat().st_size > MAX_IMAGE_BYTES:
        report.skipped.append(f"{path}: larger than {MAX_IMAGE_BYTES} bytes")
        return
    try:
        report.samples.append(_make_sample(str(path), path, 0, path.read_bytes(), caption))
    except ValueError as exc:
        report.skipped.append(str(exc))


def _scan_shard(shard: Path, report: ScanReport) -> None:
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, tarfile.TarInfo] = {}
    try:
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
                    where = f"{shard}:{member.name}"
                    if member.size > MAX_IMAGE_BYTES:
                        report.skipped.append(f"{where}: larger than {MAX_IMAGE_BYTES} bytes")
                        continue
                    raw.seek(member.offset_data)
                    data = raw.read(member.size)
                    caption = ""
                    if stem in captions:
                        raw.seek(captions[stem].offset_data)
                        caption = _caption_text(raw.read(captions[stem].size), where)
                    try:
                        report.samples.append(
                            _make_sample(where, shard, member.offset_data, data, caption)
                        )
                    except ValueError as exc:
                        report.skipped.append(str(exc))
    except (tarfile.TarError, OSError) as exc:
        report.skipped.append(f"{shard}: not a readable tar shard ({exc})")


def scan_shard(shard: Path) -> ScanReport:
    """The samples of one WebDataset tar shard, e.g. a chunk leased from a dataset server."""
    report = ScanReport([], [], 0)
    _scan_shard(Path(shard), report)
    return _reported(report)


def _reported(report: ScanReport) -> ScanReport:
    """Log what was skipped and count the empty captions."""
    for line in report.skipped:
        log.warning("skipping %s", line)
    report.empty_captions = sum(1 for s in report.samples if not s.caption)
    return report


def scan(root: Path) -> ScanReport:
    """Every sample under ``root`` (image files and ``*.tar`` shards, recursively).

    Raises:
        ConfigError: ``root`` is missing or holds no usable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"training data folder {root} does not exist or is not a folder")
    report = ScanReport([], [], 0)
    for path in _folder_images(root):
        _scan_folder_image(path, report)
    for shard in sorted(root.rglob("*.tar")):
        _scan_shard(shard, report)
    _reported(report)
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
