"""Packing edge cases: chunk size bounds, output inside the source, damaged parquet, big tar
members that are not samples."""

from __future__ import annotations

import io
import random
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from dandelion_p2p.dataset.chunks import ChunkDir
from dandelion_p2p.dataset.pack import MAX_PACK_CHUNK_BYTES, UNREADABLE, pack
from dandelion_p2p.dataset.sources import find_units, read_unit
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity
from tests.dataset.helpers import image_bytes, image_folder


def test_every_chunk_stays_within_the_chunk_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    for i in range(40):  # images of many sizes, so chunks end at every offset in a record
        (src / f"{i:03d}.png").write_bytes(image_bytes(i, size=rng.randrange(24, 64)))
        (src / f"{i:03d}.txt").write_text("x" * rng.randrange(0, 900))
    chunk_bytes = 64 * 1024
    manifest, _ = pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=chunk_bytes)
    sizes = [c.size for c in manifest.chunks]
    assert len(sizes) > 3 and max(sizes) <= chunk_bytes, sizes
    store = ChunkDir(tmp_path / "out")
    assert all(store.size_of(c.hash) == c.size for c in manifest.chunks)


def test_the_chunk_size_leaves_room_for_tar_padding(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 1)
    with pytest.raises(ConfigError, match="chunk-size"):
        pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=MAX_PACK_CHUNK_BYTES + 1)


def test_packing_into_a_folder_inside_the_source_does_not_pack_the_pack(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 3)
    out = src / "packed"
    counts = [pack(src, out, Identity.generate(), chunk_bytes=64 * 1024)[0].samples
              for _ in range(3)]
    assert counts == [3, 3, 3]
    with pytest.raises(ConfigError, match="cannot be the source"):
        find_units(src, exclude=src)


def test_a_damaged_parquet_file_is_reported_and_the_rest_packed(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = image_folder(tmp_path / "src", 2)
    table = pa.table({
        "image": [image_bytes(100 + i) for i in range(6)],
        "caption": [f"row {i}" for i in range(6)],
    })
    path = src / "part.parquet"
    pq.write_table(table, path, row_group_size=2, compression="none")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    # Overwrite the page header of the second row group (the footer stays readable).
    raw[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))

    manifest, report = pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=1 << 20)
    unreadable = [p for p in report.problems if p.kind == UNREADABLE]
    assert len(unreadable) == 1 and unreadable[0].origin.startswith("part.parquet#")
    assert "unreadable parquet" in unreadable[0].detail
    assert manifest.samples >= 2  # the folder's images (rows read before the damage too)


def test_tar_members_that_are_not_images_or_captions_are_not_read(tmp_path: Path) -> None:
    shard = tmp_path / "shard.tar"
    big = 24 * 1024 * 1024
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("s1.png", image_bytes(1)), ("s1.txt", b"one"),
                              ("s1.npy", b"\0" * big), ("s2.png", image_bytes(2))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (unit,) = find_units(shard)
    tracemalloc.start()
    try:
        samples = list(read_unit(unit, shard))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.caption for s in samples] == ["one", None]
    assert all(s.image for s in samples)
    assert peak < 4 * 1024 * 1024, peak
