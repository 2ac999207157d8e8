"""Where samples come from when packing: image + caption folders, WebDataset tars, parquet.

Every reader yields ``RawSample`` in a deterministic order (paths sorted, tar members and
parquet rows in file order), so packing the same input twice gives the same chunks. Readers
do not judge images; ``pack`` checks each one. Symlinks that lead outside the source folder
are refused unless followed on request (``walk.py``); captions are read by ``captions.py``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dandelion_p2p.dataset.captions import (
    CAPTION_EXTENSIONS,
    MAX_CAPTION_BYTES,
    Caption,
    decode_caption,
    read_caption_file,
)
from dandelion_p2p.dataset.probe import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES
from dandelion_p2p.dataset.walk import RefusedLink, list_folder
from dandelion_p2p.errors import ConfigError

MAX_SAMPLE_BYTES = MAX_IMAGE_BYTES
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
_TAR_WANTED = {e.lstrip(".") for e in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS}
"""Tar member extensions read into memory; other members (depth maps, arrays) are skipped."""


@dataclass(frozen=True, slots=True)
class RawSample:
    origin: str
    """Where the sample came from, relative to the source: shown in the report."""
    image: bytes | None
    """None when the image could not be read at all (``problem`` says why)."""
    caption: str | None
    """None when no caption was found."""
    problem: str = ""
    caption_problem: str = ""
    """Set when the caption is not valid UTF-8 (it is read with replacement characters)."""


REFUSED_LINK = "refused_link"
FOLLOW_HINT = "--follow-symlinks follows it"


@dataclass(frozen=True, slots=True)
class SourceUnit:
    """One input file: an image (with its caption file), a tar or a parquet file; or a
    symlink leading outside the source, refused (``detail`` says where it leads)."""

    path: Path
    kind: str  # "image" | "tar" | "parquet" | REFUSED_LINK
    caption_path: Path | None = None
    detail: str = ""


def find_units(src: Path, *, exclude: Path | None = None,
               follow_symlinks: bool = False) -> list[SourceUnit]:
    """Every input unit under ``src`` in deterministic order; raises ``ConfigError``.

    ``exclude`` is a folder left out of the walk: the pack's own output when it lies inside
    the source, whose chunk tars would otherwise be packed again. Symlinks leading outside
    ``src`` become ``REFUSED_LINK`` units unless ``follow_symlinks``.
    """
    if src.is_file():
        kind = _kind_of(src)
        if kind is None:
            raise ConfigError(f"{src}: not an image, a .tar or a .parquet file")
        return [_unit(src, kind)]
    if not src.is_dir():
        raise ConfigError(f"{src} does not exist")
    if exclude is not None and exclude.resolve() == src.resolve():
        raise ConfigError(f"{src}: the output folder cannot be the source folder itself")
    listing = list_folder(src, follow_symlinks=follow_symlinks, skip_hidden=True,
                          exclude=exclude)
    present = {Path(f) for f in listing.files}
    units: list[SourceUnit] = []
    for entry in listing.entries:
        if isinstance(entry, RefusedLink):
            if entry.is_dir or _kind_of(entry.path) or _is_caption(entry.path):
                units.append(SourceUnit(entry.path, REFUSED_LINK,
                                        detail=entry.explain(FOLLOW_HINT)))
            continue
        path = Path(entry)
        kind = _kind_of(path)
        if kind is not None:
            units.append(_unit(path, kind, present))
    return units


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix == ".tar":
        return "tar"
    if suffix == ".parquet":
        return "parquet"
    return None


def _is_caption(path: Path) -> bool:
    return path.suffix.lower() in CAPTION_EXTENSIONS


def _unit(path: Path, kind: str, present: set[Path] | None = None) -> SourceUnit:
    """``present``: the files of the walk (a caption refused as a link is not among them);
    None for a single file named by the user, whose caption is looked for beside it."""
    if kind != "image":
        return SourceUnit(path, kind)
    for ext in CAPTION_EXTENSIONS:
        candidate = path.with_suffix(ext)
        found = candidate.is_file() if present is None else candidate in present
        if found:
            return SourceUnit(path, kind, candidate)
    return SourceUnit(path, kind)


def read_unit(unit: SourceUnit, src: Path) -> Iterator[RawSample]:
    """The samples of one unit; a refused link gives none (the caller reports it)."""
    if unit.kind == "image":
        yield _read_image_file(unit, src)
    elif unit.kind == "tar":
        yield from _read_tar(unit.path, relative_origin(unit.path, src))
    elif unit.kind == "parquet":
        yield from _read_parquet(unit.path, relative_origin(unit.path, src))


def relative_origin(path: Path, src: Path) -> str:
    """How the report names ``path``: relative to the source folder."""
    try:
        return str(path.relative_to(src)) if src.is_dir() else path.name
    except ValueError:
        return path.name


def _read_image_file(unit: SourceUnit, src: Path) -> RawSample:
    origin = relative_origin(unit.path, src)
    try:
        size = unit.path.stat().st_size
        if size > MAX_SAMPLE_BYTES:
            return RawSample(origin, None, None, f"image larger than {MAX_SAMPLE_BYTES} bytes")
        image = unit.path.read_bytes()
    except OSError as exc:
        return RawSample(origin, None, None, f"unreadable: {exc.strerror}")
    if unit.caption_path is None:
        return RawSample(origin, image, None)
    try:
        caption = read_caption_file(unit.caption_path)
    except OSError:
        return RawSample(origin, image, None)
    return _with_caption(origin, image, caption, unit.caption_path.name)


def _with_caption(origin: str, image: bytes, caption: Caption, caption_name: str) -> RawSample:
    problem = f"{caption_name}: {caption.problem}" if caption.problem else ""
    return RawSample(origin, image, caption.text, caption_problem=problem)


def _read_tar(path: Path, origin: str) -> Iterator[RawSample]:
    """A WebDataset shard: consecutive members sharing a key (name up to the first dot of the
    base name) form one sample."""
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        yield RawSample(origin, None, None, f"unreadable tar: {exc}")
        return
    with tar:
        key: str | None = None
        files: dict[str, bytes] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key:
                    if key is not None:
                        yield _tar_sample(origin, key, files)
                    key, files = member_key, {}
                if ext.lower() not in _TAR_WANTED:
                    continue
                if member.size > MAX_SAMPLE_BYTES:
                    files[ext.lower()] = b""
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    files[ext.lower()] = f.read()
        except (OSError, tarfile.TarError, EOFError) as exc:
            yield RawSample(f"{origin}:{key or ''}", None, None, f"truncated tar: {exc}")
            return
        if key is not None:
            yield _tar_sample(origin, key, files)


def _tar_sample(origin: str, key: str, files: dict[str, bytes]) -> RawSample:
    where = f"{origin}:{key}"
    image = next((files[e.lstrip(".")] for e in IMAGE_EXTENSIONS if e.lstrip(".") in files), None)
    if image is None:
        return RawSample(where, None, None, "no image in sample")
    if not image:
        return RawSample(where, None, None, f"image larger than {MAX_SAMPLE_BYTES} bytes")
    caption_ext = next((e.lstrip(".") for e in CAPTION_EXTENSIONS if e.lstrip(".") in files),
                       None)
    if caption_ext is None:
        return RawSample(where, image, None)
    return _with_caption(where, image, decode_caption(files[caption_ext]),
                         f"{key}.{caption_ext}")


def _read_parquet(path: Path, origin: str) -> Iterator[RawSample]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{path}: reading parquet needs pyarrow; install it with "
            "`pip install 'dandelion-p2p[parquet]'`"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own hierarchy for unreadable files
        yield RawSample(origin, None, None, f"unreadable parquet: {exc}")
        return
    names = parquet.schema_arrow.names
    image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    caption_col = next((c for c in PARQUET_CAPTION_COLUMNS if c in names), None)
    if image_col is None:
        raise ConfigError(
            f"{path}: no image column (one of {', '.join(PARQUET_IMAGE_COLUMNS)}); "
            f"columns are {', '.join(names)}"
        )
    columns = [image_col] + ([caption_col] if caption_col else [])
    row = 0
    batches = parquet.iter_batches(columns=columns, batch_size=64)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            images = batch.column(image_col).to_pylist()
            captions = (batch.column(caption_col).to_pylist() if caption_col
                        else [None] * len(images))
        except Exception as exc:  # a damaged page: pyarrow raises OSError and its own types
            yield RawSample(f"{origin}#{row}", None, None,
                            f"unreadable parquet from row {row} on: {exc}")
            return
        for image, caption in zip(images, captions, strict=True):
            yield _parquet_sample(f"{origin}#{row}", image, caption)
            row += 1


def _parquet_sample(where: str, image: Any, caption: Any) -> RawSample:
    # Hugging Face datasets store images as {"bytes": ..., "path": ...}.
    if isinstance(image, dict):
        image = image.get("bytes")
    if not isinstance(image, bytes | bytearray) or not image:
        return RawSample(where, None, None, "no image bytes in row")
    if len(image) > MAX_SAMPLE_BYTES:
        return RawSample(where, None, None, f"image larger than {MAX_SAMPLE_BYTES} bytes")
    text = caption.strip()[:MAX_CAPTION_BYTES] if isinstance(caption, str) else None
    return RawSample(where, bytes(image), text)
