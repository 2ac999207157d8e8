"""The score book on disk: one JSON file, replaced atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dandelion_p2p.files import write_atomically
from dandelion_p2p.reputation.book import ScoreBook, ScorePolicy

log = logging.getLogger(__name__)

SCORES_FILENAME = "scores.json"


def save_book(book: ScoreBook, path: Path) -> None:
    """Write ``book`` to ``path``: a crash leaves the old file or the new one.

    Raises ``OSError`` when the directory cannot be written.
    """
    write_atomically(path, json.dumps(book.to_json(), indent=1).encode())


def load_book(path: Path, policy: ScorePolicy | None = None) -> ScoreBook:
    """The book saved at ``path``; an empty one if there is none yet.

    A file that cannot be read or parsed is not fatal: losing scores only forgives peers, so
    we log a warning and start empty rather than refuse to run.
    """
    try:
        return ScoreBook.from_json(json.loads(path.read_bytes()), policy)
    except FileNotFoundError:
        pass
    except Exception as exc:  # whatever is wrong with the file, the daemon must start
        log.warning("ignoring unreadable score book %s (%s); starting empty", path, exc)
    return ScoreBook(policy)
