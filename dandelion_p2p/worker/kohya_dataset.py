"""Subsets of a training folder as kohya sd-scripts users lay them out.

Each folder directly under the data folder is a subset. A kohya ``N_name`` folder
(``10_cat``) trains each of its images N times per epoch; ``[[data.subsets]]`` entries in the
run config name a folder and set its repeats, loss weight and caption and augmentation
settings (unset ones are the ``[data]`` ones). Images directly in the data folder, and in
folders neither named so nor listed, train once per epoch with the ``[data]`` settings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from dandelion_p2p.runconfig.schema import RunConfig, SubsetConfig
from dandelion_p2p.worker.data import Sample

log = logging.getLogger(__name__)

T = TypeVar("T")
_REPEATS = re.compile(r"(\d+)_(.+)")
MAX_FOLDER_REPEATS = 10_000
"""A larger N (or 0) in a folder name is not taken for repeats (with a warning): an epoch of
it would never end."""


@dataclass(frozen=True, slots=True)
class SubsetSettings:
    """What applies to one subset's images, every setting resolved."""

    name: str
    repeats: int = 1
    loss_weight: float = 1.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    flip: bool = False
    random_crop: bool = False


def folder_repeats(name: str) -> int | None:
    """N of a kohya ``N_name`` folder name, None for any other name."""
    match = _REPEATS.fullmatch(name)
    if match is None:
        return None
    repeats = int(match.group(1))
    return repeats if 1 <= repeats <= MAX_FOLDER_REPEATS else None


def defaults(config: RunConfig) -> SubsetSettings:
    """The settings of images in no subset (and of every leased chunk)."""
    d = config.data
    return SubsetSettings("", 1, 1.0, d.shuffle_caption, d.keep_tokens, d.tag_dropout,
                          config.training.caption_dropout, d.flip, d.random_crop)


def _resolve(name: str, entry: SubsetConfig | None, base: SubsetSettings) -> SubsetSettings:
    from_name = folder_repeats(name)
    if entry is None:
        return replace(base, name=name, repeats=from_name or 1)
    return SubsetSettings(
        name=name,
        repeats=entry.repeats or from_name or 1,
        loss_weight=entry.loss_weight,
        shuffle_caption=_pick(entry.shuffle_caption, base.shuffle_caption),
        keep_tokens=_pick(entry.keep_tokens, base.keep_tokens),
        tag_dropout=_pick(entry.tag_dropout, base.tag_dropout),
        caption_dropout=_pick(entry.caption_dropout, base.caption_dropout),
        flip=_pick(entry.flip, base.flip),
        random_crop=_pick(entry.random_crop, base.random_crop),
    )


def _pick(own: T | None, inherited: T) -> T:
    return inherited if own is None else own


def subset_table(folders: Sequence[str], config: RunConfig) -> list[SubsetSettings]:
    """The settings of each subset folder (``""``: images in no subset) under ``config``."""
    base = defaults(config)
    listed = {entry.folder: entry for entry in config.data.subsets}
    return [base if not name else _resolve(name, listed.get(name), base) for name in folders]


def assign_subsets(root: Path, samples: Sequence[Sample],
                   config: RunConfig) -> tuple[list[str], list[Sample]]:
    """The subset folders (index 0, ``""``: images in no subset) and ``samples`` with
    ``subset`` set to their folder's index.

    A listed folder that holds no usable image is named in a warning: a typo in a folder
    name would otherwise train another mix than meant, in silence.
    """
    folders = [""]
    index: dict[str, int] = {}
    out: list[Sample] = []
    root = Path(root)
    for sample in samples:
        try:
            parts = sample.path.relative_to(root).parts
        except ValueError:
            parts = ()
        folder = parts[0] if len(parts) > 1 else ""
        if not folder:
            out.append(sample)
            continue
        if folder not in index:
            index[folder] = len(folders)
            folders.append(folder)
            if _REPEATS.fullmatch(folder) and folder_repeats(folder) is None:
                log.warning("folder %s: repeats must be 1-%d; its images train once per "
                            "epoch", folder, MAX_FOLDER_REPEATS)
        out.append(replace(sample, subset=index[folder]))
    for name in sorted({entry.folder for entry in config.data.subsets} - index.keys()):
        log.warning("data.subsets names folder %r, which holds no usable image under %s",
                    name, root)
    table = subset_table(folders, config)
    counts = [0] * len(folders)
    for sample in out:
        counts[sample.subset] += 1
    for settings, count in zip(table[1:], counts[1:], strict=True):
        log.info("subset %s: %d images x %d repeats, loss weight %g", settings.name, count,
                 settings.repeats, settings.loss_weight)
    return folders, out


def epoch_entries(samples: Sequence[Sample], table: Sequence[SubsetSettings]) -> list[int]:
    """Sample indices as one epoch draws them: each repeated its subset's ``repeats`` times."""
    return [i for i, sample in enumerate(samples)
            for _ in range(table[sample.subset].repeats)]

