"""What ``pack`` reads from a folder: symlinks that lead outside it, captions that are not
UTF-8."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from click.testing import CliRunner

from dandelion_p2p.cli import main
from dandelion_p2p.dataset.captions import MAX_CAPTION_BYTES
from dandelion_p2p.dataset.pack import CAPTION_NOT_UTF8, SYMLINK_OUTSIDE, pack
from dandelion_p2p.identity import Identity, write_identity
from tests.dataset.helpers import image_bytes, image_folder
from tests.dataset.test_pack import _samples


def _folder_with_links(tmp_path: Path) -> Path:
    """``src`` with one image of its own, a link to it, a link to an image outside, and a
    link to a folder of images outside."""
    src = image_folder(tmp_path / "src", 1)
    elsewhere = image_folder(tmp_path / "elsewhere", 1, first_seed=50)
    (tmp_path / "elsewhere" / "more").mkdir()
    (tmp_path / "elsewhere" / "more" / "deep.png").write_bytes(image_bytes(60))
    (src / "alias.png").symlink_to("img000.png")
    (src / "outside.png").symlink_to(elsewhere / "img000.png")
    (src / "outside.txt").symlink_to(elsewhere / "img000.txt")
    (src / "linked").symlink_to(elsewhere / "more", target_is_directory=True)
    return src


def _origins(out: Path) -> set[str]:
    return {json.loads(s["json"])["origin"] for s in _samples(out).values()}


def test_symlinks_leading_outside_are_refused_per_file_unless_followed(tmp_path: Path) -> None:
    src = _folder_with_links(tmp_path)
    owner = Identity.generate()

    _, report = pack(src, tmp_path / "out", owner, chunk_bytes=1 << 20)
    assert _origins(tmp_path / "out") == {"img000.png", "alias.png"}
    refused = {p.origin: p.detail for p in report.problems if p.kind == SYMLINK_OUTSIDE}
    assert set(refused) == {"outside.png", "outside.txt", "linked"}
    elsewhere = os.path.realpath(tmp_path / "elsewhere")
    assert f"symlink to {elsewhere}/img000.png" in refused["outside.png"]
    assert f"symlink to {elsewhere}/more" in refused["linked"]
    assert "--follow-symlinks" in refused["outside.png"]
    assert report.skipped == 3

    _, followed = pack(src, tmp_path / "all", owner, chunk_bytes=1 << 20,
                       follow_symlinks=True)
    assert _origins(tmp_path / "all") == {"img000.png", "alias.png", "outside.png",
                                          "linked/deep.png"}
    assert not [p for p in followed.problems if p.kind == SYMLINK_OUTSIDE]
    captions = {json.loads(s["json"])["origin"]: s["txt"]
                for s in _samples(tmp_path / "all").values()}
    assert captions["outside.png"] == b"a noise picture number 0"


def test_a_symlink_loop_is_walked_once(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", 1)
    outside = image_folder(tmp_path / "outside", 1, first_seed=9)
    (src / "out").symlink_to(outside, target_is_directory=True)
    (outside / "back").symlink_to(outside, target_is_directory=True)
    manifest, _ = pack(src, tmp_path / "packed", Identity.generate(), follow_symlinks=True)
    assert manifest.samples == 2


def test_cli_refuses_outside_links_and_follows_them_when_asked(tmp_path: Path) -> None:
    src = _folder_with_links(tmp_path)
    key = tmp_path / "owner.key"
    write_identity(key, Identity.generate())
    args = ["dataset", "pack", str(src), "--owner-key", str(key)]

    refused = CliRunner().invoke(main, [*args[:3], str(tmp_path / "a"), *args[3:]])
    assert refused.exit_code == 0, refused.output
    assert "symlink_outside: outside.png: symlink to" in refused.output
    assert "3 symlinks leading outside SRC" in refused.output
    assert "packed 2 samples" in refused.output

    followed = CliRunner().invoke(
        main, [*args[:3], str(tmp_path / "b"), *args[3:], "--follow-symlinks"])
    assert followed.exit_code == 0, followed.output
    assert "symlink_outside" not in followed.output
    assert "packed 4 samples" in followed.output


def test_captions_that_are_not_utf8_are_packed_with_replacement_and_reported(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, caption in (
        ("latin", "café au lait".encode("latin-1")),
        ("fine", "crème brûlée".encode()),
        ("bom", b"\xef\xbb\xbfwith a byte order mark"),
        # Cut at MAX_CAPTION_BYTES in the middle of a two-byte character: not an encoding
        # problem, the half character is dropped.
        ("long", ("x" * (MAX_CAPTION_BYTES - 1) + "é and more").encode()),
    ):
        (src / f"{name}.png").write_bytes(image_bytes(len(name)))
        (src / f"{name}.txt").write_bytes(caption)
    with tarfile.open(src / "shard.tar", "w") as tar:
        for member, payload in (("k.png", image_bytes(99)), ("k.txt", b"na\xefve \xff")):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    manifest, report = pack(src, tmp_path / "out", Identity.generate(), chunk_bytes=1 << 20)
    assert manifest.samples == 5
    assert {(p.origin, p.kind) for p in report.problems} == {
        ("latin.png", CAPTION_NOT_UTF8), ("shard.tar:k", CAPTION_NOT_UTF8)}
    assert report.skipped == 0
    detail = next(p.detail for p in report.problems if p.origin == "latin.png")
    assert "latin.txt" in detail and "U+FFFD" in detail
    captions = {json.loads(s["json"])["origin"]: s["txt"].decode()
                for s in _samples(tmp_path / "out").values()}
    assert captions["latin.png"] == "caf\ufffd au lait"
    assert captions["shard.tar:k"] == "na\ufffdve \ufffd"
    assert captions["fine.png"] == "crème brûlée"
    assert captions["bom.png"] == "with a byte order mark"
    assert captions["long.png"] == "x" * (MAX_CAPTION_BYTES - 1)
