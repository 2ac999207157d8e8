"""The worker's folder scan: symlinks, captions that are not UTF-8, the pixel limit, and the
cache of content hashes that makes a re-scan cheap."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import blake3
import pytest
from PIL import Image, PngImagePlugin

from dandelion_p2p.dataset.pack import pack
from dandelion_p2p.dataset.probe import MAX_PIXELS
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity
from dandelion_p2p.local_settings import LocalSettings
from dandelion_p2p.worker.data import Sample, scan
from dandelion_p2p.worker.feeds import FolderFeed
from tests.dataset.helpers import image_bytes, image_folder
from tests.dataset.test_pack import _samples


def _png(text: str = "", size: tuple[int, int] = (32, 24)) -> bytes:
    """A small PNG; ``text`` goes into a tEXt chunk, so equal-length texts give files of equal
    size and pixels but different bytes."""
    info = PngImagePlugin.PngInfo()
    info.add_text("note", text)
    out = io.BytesIO()
    Image.new("RGB", size, (30, 140, 90)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _names(samples: list[Sample]) -> set[str]:
    """Sample keys relative to the ``src`` folder."""
    return {s.key.split("/src/", 1)[-1] for s in samples}


def test_symlinks_leading_outside_are_skipped_and_named_unless_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = image_folder(tmp_path / "src", 1)
    elsewhere = image_folder(tmp_path / "elsewhere", 1, first_seed=7)
    (src / "alias.png").symlink_to("img000.png")
    (src / "outside.png").symlink_to(elsewhere / "img000.png")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)

    with caplog.at_level(logging.WARNING):
        report = scan(src)
    assert _names(report.samples) == {"img000.png", "alias.png"}
    target = os.path.realpath(elsewhere / "img000.png")
    line = next(s for s in report.skipped if "outside.png" in s)
    assert f"symlink to {target}" in line and "follow_symlinks" in line
    assert any(s.startswith(f"{src / 'linked'}: symlink to") for s in report.skipped)
    assert f"outside.png: symlink to {target}" in caplog.text

    followed = scan(src, follow_symlinks=True)
    assert _names(followed.samples) == {"img000.png", "alias.png", "outside.png",
                                        "linked/img000.png"}
    assert not followed.skipped


def test_captions_are_read_as_pack_reads_them_and_bad_ones_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "latin.png").write_bytes(image_bytes(1))
    (src / "latin.txt").write_bytes("café au lait".encode("latin-1"))
    (src / "fine.png").write_bytes(image_bytes(2))
    (src / "fine.caption").write_bytes("crème brûlée\n".encode())
    with tarfile.open(src / "shard.tar", "w") as tar:
        for member, payload in (("k.png", image_bytes(3)), ("k.txt", b"na\xefve")):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    with caplog.at_level(logging.WARNING):
        report = scan(src)
    worker = {Path(s.key.split(":")[-1]).stem: s.caption for s in report.samples}
    assert worker == {"latin": "caf\ufffd au lait", "fine": "crème brûlée", "k": "na\ufffdve"}
    assert len(report.caption_problems) == 2
    assert f"{src / 'latin.txt'}: not valid UTF-8" in caplog.text
    assert "shard.tar:k.txt: not valid UTF-8" in caplog.text

    pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=1 << 20)
    packed = {Path(json.loads(s["json"])["origin"].split(":")[-1]).stem: s["txt"].decode()
              for s in _samples(tmp_path / "out").values()}
    assert packed == worker


def test_an_image_over_the_pixel_limit_is_skipped_from_its_header(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 1)
    width, height = 8193, MAX_PIXELS // 8192
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    (src / "huge.png").write_bytes(out.getvalue())
    # Header intact, pixel data cut: only a check of the header (not a decode) can say why.
    (src / "huge_cut.png").write_bytes(out.getvalue()[:200])

    report = scan(src)
    assert _names(report.samples) == {"img000.png"}
    for name in ("huge.png", "huge_cut.png"):
        line = next(s for s in report.skipped if f"{name}:" in s)
        assert f"{width}x{height} is over the limit of {MAX_PIXELS} pixels" in line


def test_a_rescan_takes_hashes_from_the_cache_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png("v1"))
    (src / "a.txt").write_text("first caption")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cache = tmp_path / "work" / "cache" / "scan.sqlite"

    first = scan(src, cache_file=cache)
    assert cache.is_file()
    (sample,) = first.samples
    assert sample.content_hash == blake3.blake3(_png("v1")).hexdigest()

    # New bytes of the same size, the old mtime put back: the cache cannot tell, so the
    # re-scan answers from it without reading the image. Captions are always read afresh.
    stat = (src / "a.png").stat()
    (src / "a.png").write_bytes(_png("v2"))
    os.utime(src / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (src / "a.txt").write_text("second caption")
    again = scan(src, cache_file=cache)
    assert [s.content_hash for s in again.samples] == [sample.content_hash]
    assert again.samples[0].caption == "second caption"
    assert again.skipped == first.skipped and "broken.png" in again.skipped[0]

    os.utime(src / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = scan(src, cache_file=cache)
    assert changed.samples[0].content_hash == blake3.blake3(_png("v2")).hexdigest()
    assert (changed.samples[0].width, changed.samples[0].height) == (32, 24)


def _shard(path: Path, note: str) -> None:
    with tarfile.open(path, "w") as tar:
        for member, payload in (("k.png", _png(note)), ("k.txt", b"caption")):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_shard_members_are_cached_and_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _shard(src / "shard.tar", "v1")
    cache = tmp_path / "scan.sqlite"
    cache.write_bytes(b"this is not an SQLite database" * 100)

    first = scan(src, cache_file=cache)
    assert first.samples[0].caption == "caption"
    assert first.samples[0].content_hash == blake3.blake3(_png("v1")).hexdigest()
    stat = (src / "shard.tar").stat()
    _shard(src / "shard.tar", "v2")
    os.utime(src / "shard.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (src / "shard.tar").stat().st_size == stat.st_size
    again = scan(src, cache_file=cache)
    assert again.samples[0].content_hash == first.samples[0].content_hash


def test_folder_feed_keeps_its_scan_cache_and_follows_links_when_told(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 2)
    elsewhere = image_folder(tmp_path / "elsewhere", 1, first_seed=5)
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    cache = tmp_path / "work" / "cache" / "scan.sqlite"

    alone = FolderFeed(src, [(96, 96)], 2, [1], (0, 1), scan_cache=cache)
    assert len(alone.samples) == 2 and cache.is_file()
    followed = FolderFeed(src, [(96, 96)], 2, [1], (0, 1), scan_cache=cache,
                          follow_symlinks=True)
    assert len(followed.samples) == 3


def test_following_symlinks_is_a_local_setting() -> None:
    assert LocalSettings().follow_symlinks is False
    assert LocalSettings().updated({"follow_symlinks": True}).follow_symlinks is True
    with pytest.raises(ConfigError, match="follow_symlinks must be true or false"):
        LocalSettings().updated({"follow_symlinks": "yes"})


def test_a_file_name_that_is_not_utf8_is_scanned_and_cached(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # A Latin-1 name, as an archive from another system unpacks it: not valid UTF-8.
    name = os.fsdecode(b"caf\xe9")
    (src / f"{name}.png").write_bytes(_png("latin"))
    (src / f"{name}.txt").write_text("a cafe")
    cache = tmp_path / "work" / "cache" / "scan.sqlite"
    first = scan(src, cache_file=cache)
    assert [s.caption for s in first.samples] == ["a cafe"]
    assert cache.is_file()
    again = scan(src, cache_file=cache)
    assert [s.content_hash for s in again.samples] == [first.samples[0].content_hash]


def test_the_worker_takes_the_files_the_packer_takes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / ".ipynb_checkpoints").mkdir(parents=True)
    (src / "a.png").write_bytes(_png("a"))
    (src / "b.bmp").write_bytes(image_bytes(2, 24, "BMP"))
    (src / ".hidden.png").write_bytes(_png("hidden"))
    (src / ".ipynb_checkpoints" / "a-checkpoint.png").write_bytes(_png("copy"))
    assert _names(scan(src).samples) == {"a.png", "b.bmp"}
