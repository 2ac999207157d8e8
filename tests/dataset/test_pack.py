"""Packing real image folders, WebDataset tars and parquet files into signed chunks."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from dandelion_p2p.cli import main
from dandelion_p2p.dataset.chunks import chunk_hash
from dandelion_p2p.dataset.manifest import (
    MANIFEST_FILENAME,
    load_manifest,
    signed_digest,
    signed_document,
)
from dandelion_p2p.dataset.pack import BROKEN, MISSING_CAPTION, check_image, pack
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity, write_identity
from tests.dataset.helpers import image_bytes, image_folder


def _messy_folder(root: Path) -> Path:
    image_folder(root, 3)
    (root / "sub").mkdir()
    (root / "sub" / "kohya.jpg").write_bytes(image_bytes(10, fmt="JPEG"))
    (root / "sub" / "kohya.caption").write_text("captioned the kohya way")
    (root / "no_caption.png").write_bytes(image_bytes(11))
    good = image_bytes(12, fmt="JPEG")
    (root / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated mid-stream
    (root / "broken.txt").write_text("never packed")
    (root / "garbage.png").write_bytes(b"not an image at all")
    (root / "notes.md").write_text("ignored: not an image")
    return root


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    manifest = load_manifest(out)
    for entry in manifest.chunks:
        data = (out / f"{entry.hash}.tar").read_bytes()
        assert chunk_hash(data) == entry.hash and len(data) == entry.size
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                assert f is not None
                samples.setdefault(key, {})[ext] = f.read()
    return samples


def test_broken_image_and_missing_caption_are_reported_and_the_rest_packed(
    tmp_path: Path,
) -> None:
    src = _messy_folder(tmp_path / "src")
    owner = Identity.generate()
    manifest, report = pack(src, tmp_path / "out", owner, chunk_bytes=64 * 1024)

    assert report.samples == 5 and manifest.samples == 5
    kinds = {(p.origin, p.kind) for p in report.problems}
    assert kinds == {
        ("broken.jpg", BROKEN),
        ("garbage.png", BROKEN),
        ("no_caption.png", MISSING_CAPTION),
    }
    assert report.counts == {BROKEN: 2, MISSING_CAPTION: 1}
    assert manifest.skipped == report.counts

    samples = _samples(tmp_path / "out")
    by_origin = {json.loads(s["json"])["origin"]: s for s in samples.values()}
    assert set(by_origin) == {"img000.png", "img001.png", "img002.png", "no_caption.png",
                              "sub/kohya.jpg"}
    assert by_origin["no_caption.png"]["txt"] == b""
    assert by_origin["sub/kohya.jpg"]["txt"] == b"captioned the kohya way"
    assert by_origin["img001.png"]["txt"] == b"a noise picture number 1"
    assert by_origin["sub/kohya.jpg"]["jpg"] == (src / "sub" / "kohya.jpg").read_bytes()
    assert json.loads(by_origin["img000.png"]["json"])["width"] == 96
    report_file = json.loads((tmp_path / "out" / "pack-report.json").read_text())
    assert report_file["counts"] == {BROKEN: 2, MISSING_CAPTION: 1}


def test_packing_is_deterministic_and_the_manifest_is_signed(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 6)
    owner = Identity.generate()
    first, _ = pack(src, tmp_path / "a", owner, chunk_bytes=72 * 1024)
    second, _ = pack(src, tmp_path / "b", owner, chunk_bytes=72 * 1024)
    assert [c.hash for c in first.chunks] == [c.hash for c in second.chunks]
    assert len(first.chunks) == 3
    assert load_manifest(tmp_path / "a") == first
    assert first.owner == owner.peer_id.to_base58()

    doc = json.loads((tmp_path / "a" / MANIFEST_FILENAME).read_text())
    doc["manifest"]["chunks"][0]["samples"] += 1
    doc["manifest"]["samples"] += 1
    (tmp_path / "a" / MANIFEST_FILENAME).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="signature"):
        load_manifest(tmp_path / "a")


def test_webdataset_tar_and_parquet_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "shard-000.tar", "w") as tar:
        for key, payload in (("s1.jpg", image_bytes(1, fmt="JPEG")), ("s1.txt", b"tar one"),
                             ("s2.png", image_bytes(2)), ("s2.txt", b"tar two"),
                             ("s3.png", b"\x89PNG broken"), ("s3.txt", b"bad")):
            info = tarfile.TarInfo(key)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "image": [{"bytes": image_bytes(3), "path": "x.png"}, {"bytes": b"junk", "path": "y"}],
        "caption": ["parquet one", "parquet broken"],
    })
    pq.write_table(table, src / "part.parquet")

    manifest, report = pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=1 << 20)
    assert manifest.samples == 3
    assert {(p.origin, p.kind) for p in report.problems} == {
        ("shard-000.tar:s3", BROKEN), ("part.parquet#1", BROKEN)}
    captions = sorted(s["txt"] for s in _samples(tmp_path / "out").values())
    assert captions == [b"parquet one", b"tar one", b"tar two"]


def test_check_image_refuses_what_pillow_cannot_decode() -> None:
    assert check_image(image_bytes(5)).ext == "png"
    with pytest.raises(ValueError):
        check_image(b"GIF89a" + b"\x00" * 20)
    jpeg = image_bytes(6, fmt="JPEG")
    with pytest.raises(ValueError):
        check_image(jpeg[:200])


def test_refuses_a_non_empty_folder_that_is_not_a_pack(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        pack(src, out, Identity.generate())
    assert (out / "precious.txt").exists()


def test_cli_pack_prints_a_clear_report(tmp_path: Path) -> None:
    src = _messy_folder(tmp_path / "src")
    key = tmp_path / "owner.key"
    owner = Identity.generate()
    write_identity(key, owner)
    result = CliRunner().invoke(
        main, ["dataset", "pack", str(src), str(tmp_path / "out"), "--chunk-size", "64k",
               "--owner-key", str(key)],
    )
    assert result.exit_code == 0, result.output
    assert "broken_image: broken.jpg" in result.output
    assert "missing_caption: no_caption.png" in result.output
    assert "packed 5 samples" in result.output
    assert "2 broken images" in result.output and "1 missing captions" in result.output
    assert owner.peer_id.to_base58() in result.output
    signed = signed_digest(signed_document(tmp_path / "out"))
    assert f'[dataset] manifest = "{signed}"' in result.output

    bad = CliRunner().invoke(main, ["dataset", "pack", str(src), str(tmp_path / "o2"),
                                    "--chunk-size", "lots", "--owner-key", str(key)])
    assert bad.exit_code != 0 and "not a size" in bad.output


def test_parquet_without_pyarrow_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "part.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"pyarrow.*dandelion-p2p\[parquet\]"):
        pack(src, tmp_path / "out", Identity.generate())


def test_chunk_size_is_bounded(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 1)
    for size in (1024, 1 << 30):
        with pytest.raises(ConfigError, match="chunk-size"):
            pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=size)


def test_a_server_refuses_a_pack_with_missing_or_damaged_chunks(tmp_path: Path) -> None:
    from dandelion_p2p.dataset.server import DatasetServer

    out = tmp_path / "out"
    manifest, _ = pack(image_folder(tmp_path / "src", 4), out, Identity.generate(),
                       chunk_bytes=64 * 1024)
    DatasetServer.check_files(manifest, out)
    first, second = manifest.chunks[0], manifest.chunks[1]
    with (out / f"{first.hash}.tar").open("ab") as f:
        f.write(b"x")
    with pytest.raises(ConfigError, match=f"{first.hash} is {first.size + 1} bytes"):
        DatasetServer.check_files(manifest, out)
    (out / f"{first.hash}.tar").unlink()
    with pytest.raises(ConfigError, match=f"{first.hash} is missing"):
        DatasetServer.check_files(manifest, out)
    assert second.hash != first.hash
