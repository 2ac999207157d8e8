"""Walking a data folder, and where its symlinks may lead.

A symlink whose target lies inside the folder is used as is (a file) or left to the walk of
its target's real place (a folder, which would otherwise be read twice). A symlink that leads
outside the folder is refused, and named with where it leads, unless the caller asked to
follow such links: a folder handed to a scanner (or to a volunteer's worker) should not be
able to pull in files from anywhere on the machine without the owner saying so. Followed
links are walked once per real folder, so a link pointing back up cannot loop.

Files are listed as strings, not ``Path`` objects: on a folder of 100,000 images pathlib's
object overhead alone took seconds of a scan that is otherwise a few system calls per file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RefusedLink:
    path: Path
    """The link, as found in the walk."""
    target: str
    """Where it leads, all links resolved."""
    is_dir: bool

    def explain(self, how_to_follow: str) -> str:
        return (f"symlink to {self.target}, outside the source folder; not followed "
                f"({how_to_follow})")


@dataclass
class Listing:
    entries: list[str | RefusedLink] = field(default_factory=list)
    """In walk order: a folder's files by name, then each subfolder's entries by name."""

    @property
    def files(self) -> list[str]:
        return [e for e in self.entries if isinstance(e, str)]

    @property
    def refused(self) -> list[RefusedLink]:
        return [e for e in self.entries if isinstance(e, RefusedLink)]


def list_folder(root: Path, *, follow_symlinks: bool = False, skip_hidden: bool = False,
                exclude: Path | None = None) -> Listing:
    """Every file under ``root`` (links to files included; paths start with ``root``) and
    every refused link.

    ``skip_hidden`` leaves out names starting with a dot; ``exclude`` is a folder left out.
    Folders that cannot be listed are left out, as ``os.walk`` does.
    """
    real_root = os.path.realpath(root)
    skip = os.path.realpath(exclude) if exclude is not None else None
    listing = Listing()
    walked = {real_root}

    def walk(folder: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        subfolders: list[str] = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not _within(target, real_root):
                    if not follow_symlinks:
                        listing.entries.append(RefusedLink(Path(entry.path), target, is_dir))
                        continue
                elif is_dir:
                    continue
            if not is_dir:
                listing.entries.append(entry.path)
                continue
            real = os.path.realpath(entry.path)
            if real != skip and real not in walked:
                walked.add(real)
                subfolders.append(entry.path)
        for sub in subfolders:
            walk(sub)

    walk(str(root))
    return listing


def path_order(path: str) -> list[str]:
    """Sort key that orders paths as ``sorted()`` orders ``Path`` objects (part by part)."""
    return path.split(os.sep)


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder
