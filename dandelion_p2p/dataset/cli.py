"""``dandelion-p2p dataset pack``: turn a folder of images into a packed, signed dataset."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from dandelion_p2p.cli_common import fail

SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b)?", re.IGNORECASE)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
SHOWN_PROBLEMS = 20


def parse_size(text: str) -> int:
    """``65536``, ``64k``, ``64M``, ``64MiB`` -> bytes (binary units)."""
    match = SIZE.fullmatch(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a size such as 64M or 1048576")
    return int(match.group(1)) * UNITS[match.group(2).lower()]


@click.group()
def dataset() -> None:
    """Pack datasets into content-addressed chunks for a run."""


@dataset.command()
@click.argument("src", type=click.Path(path_type=Path, exists=True))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--chunk-size", default="64M", show_default=True,
              help="Target bytes per chunk (k, M, G suffixes).")
@click.option("--owner-key", type=click.Path(path_type=Path),
              help="The run owner's key file (default: this machine's daemon identity).")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Data dir whose identity signs, when --owner-key is not given.")
@click.option("--follow-symlinks", is_flag=True,
              help="Follow symlinks that lead outside SRC (default: report and skip them).")
def pack(src: Path, out: Path, chunk_size: str, owner_key: Path | None,
         data_dir: Path | None, follow_symlinks: bool) -> None:
    """Pack SRC (image + .txt/.caption folders, WebDataset tars, parquet) into OUT."""
    from dandelion_p2p.config import load_config
    from dandelion_p2p.dataset.manifest import signed_digest, signed_document
    from dandelion_p2p.dataset.pack import REPORT_FILENAME
    from dandelion_p2p.dataset.pack import pack as run_pack
    from dandelion_p2p.dataset.sources import find_units
    from dandelion_p2p.errors import DandelionError
    from dandelion_p2p.identity import load_identity, load_or_create_identity

    try:
        chunk_bytes = parse_size(chunk_size)
        if owner_key is not None:
            identity = load_identity(owner_key)
        else:
            cli = {"data_dir": data_dir} if data_dir is not None else {}
            key_path = load_config("daemon", cli).identity_path
            identity = load_or_create_identity(key_path)
            click.echo(f"signing with the daemon identity {key_path}", err=True)
        units = len(find_units(src, exclude=out, follow_symlinks=follow_symlinks))
        if sys.stderr.isatty():
            with click.progressbar(length=units, label="packing", file=sys.stderr) as bar:
                manifest, report = run_pack(src, out, identity, chunk_bytes=chunk_bytes,
                                            follow_symlinks=follow_symlinks,
                                            on_unit=lambda: bar.update(1))
        else:
            manifest, report = run_pack(src, out, identity, chunk_bytes=chunk_bytes,
                                        follow_symlinks=follow_symlinks)
    except DandelionError as exc:
        fail(str(exc))
    for problem in report.problems[:SHOWN_PROBLEMS]:
        click.echo(f"{problem.kind}: {problem.origin}: {problem.detail}")
    if len(report.problems) > SHOWN_PROBLEMS:
        click.echo(f"... {len(report.problems) - SHOWN_PROBLEMS} more in {out / REPORT_FILENAME}")
    counts = report.counts
    click.echo(
        f"packed {report.samples} samples into {report.chunks} chunks "
        f"({report.bytes / 2**20:.1f} MiB) in {out}"
    )
    click.echo(
        f"skipped: {counts.get('broken_image', 0)} broken images, "
        f"{counts.get('unreadable', 0)} unreadable, "
        f"{counts.get('symlink_outside', 0)} symlinks leading outside SRC; "
        f"{counts.get('missing_caption', 0)} missing captions (packed with empty captions), "
        f"{counts.get('caption_not_utf8', 0)} captions not UTF-8 (packed with U+FFFD)"
    )
    click.echo(f"manifest: {manifest.digest} signed by {manifest.owner}")
    signed = signed_digest(signed_document(out))
    click.echo(f'for the run config: [dataset] manifest = "{signed}"')
