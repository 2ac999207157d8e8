"""What the folder scan learned about each image, kept between scans in one SQLite file
(``WORK/cache/scan.sqlite``).

An entry is keyed by where the image lies (its file, and its byte offset inside a tar shard)
and holds the content hash, the size in pixels, or why the image is left out. It is trusted
while the file keeps its size and mtime_ns, the check ``make`` and ``rsync`` rely on: a
changed file gets a new mtime and is read again. A file rewritten in place with the same size
and mtime (tools that restore times do this) is not noticed; clear the cache after such edits.

The whole table is read at start and, when anything changed, written whole to a new file that
replaces the old one, so a re-scan of an unchanged folder writes nothing. The cache only
saves time: a damaged or unwritable file is reported, started afresh, and never stops a scan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""Raise when what an entry means changes (such as the checks behind ``problem``)."""
_CREATE = """
CREATE TABLE images (
    path BLOB NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    problem TEXT NOT NULL,
    PRIMARY KEY (path, offset)
)
"""


@dataclass(frozen=True, slots=True)
class ImageFacts:
    content_hash: str
    width: int
    height: int
    problem: str = ""
    """Why the image is left out; empty for a usable one."""


_Key = tuple[str, int]
_Entry = tuple[int, int, ImageFacts]  # the file's size and mtime_ns, and the facts


class ScanCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._known = self._load()
        self._kept: dict[_Key, _Entry] = {}
        self._changed = False

    def get(self, path: str, offset: int, stat: os.stat_result) -> ImageFacts | None:
        """The facts for the image at ``offset`` in ``path`` if its file (``stat``) is
        unchanged since they were stored."""
        key = (os.path.abspath(path), offset)
        entry = self._known.get(key)
        if entry is None or entry[:2] != (stat.st_size, stat.st_mtime_ns):
            return None
        self._kept[key] = entry
        return entry[2]

    def put(self, path: str, offset: int, stat: os.stat_result, facts: ImageFacts) -> None:
        self._kept[(os.path.abspath(path), offset)] = (stat.st_size, stat.st_mtime_ns, facts)
        self._changed = True

    def save(self) -> None:
        """Keep the entries used or added since this cache was opened; drop the others
        (files gone from the folder)."""
        if not self._changed and self._kept.keys() == self._known.keys():
            return
        # Paths as the file system's bytes: a name that is not valid UTF-8 (an archive
        # unpacked from another system) is still a name, and SQLite text must be UTF-8.
        rows = [(os.fsencode(path), offset, size, mtime, f.content_hash, f.width, f.height,
                 f.problem) for (path, offset), (size, mtime, f) in self._kept.items()]
        # Written whole into a new file that then replaces the old one: a damaged cache, or
        # another worker reading it, never stands in the way, and a crash leaves either.
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            with contextlib.closing(sqlite3.connect(tmp, isolation_level=None)) as db:
                db.execute("BEGIN")
                db.execute(_CREATE)
                db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            os.replace(tmp, self.path)
        except (OSError, sqlite3.Error, ValueError) as exc:
            log.warning("cannot write the scan cache %s (%s); the next scan reads every "
                        "image again", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._known, self._changed = dict(self._kept), False

    def _load(self) -> dict[_Key, _Entry]:
        if not self.path.exists():
            return {}
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as db:
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    return {}
                rows = db.execute("SELECT path, offset, size, mtime_ns, hash, width, height, "
                                  "problem FROM images").fetchall()
        except sqlite3.Error as exc:
            # Not deleted: another worker may hold it open; the next save replaces the table.
            log.warning("the scan cache %s is unreadable (%s); reading every image again",
                        self.path, exc)
            return {}
        try:
            return {(os.fsdecode(path), offset): (size, mtime,
                                                  ImageFacts(digest, width, height, problem))
                    for path, offset, size, mtime, digest, width, height, problem in rows}
        except (TypeError, ValueError) as exc:
            log.warning("the scan cache %s holds entries of another shape (%s); reading "
                        "every image again", self.path, exc)
            return {}
