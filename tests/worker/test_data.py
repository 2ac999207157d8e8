"""Scanning image folders and tar shards; bucketing and batch plans; the LR schedule."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.worker.bucketing import make_buckets, nearest_bucket, plan_epoch
from dandelion_p2p.worker.data import scan
from dandelion_p2p.worker.schedule import lr_at
from dandelion_p2p.worker.tiny import write_images
from tests.worker.runconfigs import tiny_run


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def test_folder_and_shards_are_read_and_bad_input_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_images(tmp_path / "kohya", 2)
    (tmp_path / "kohya" / "img001.txt").unlink()
    (tmp_path / "kohya" / "img001.caption").write_text("from a .caption file")
    (tmp_path / "kohya" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "kohya" / "quiet.png").write_bytes(_png((80, 48)))
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for key, data in (("a.png", _png((64, 96))), ("a.txt", b"tar caption"),
                          ("b.webp", b"garbage")):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shard-001.tar").write_bytes(b"not a tar at all")

    with caplog.at_level(logging.WARNING):
        report = scan(tmp_path)
    by_key = {Path(s.key.split(":")[-1]).name: s for s in report.samples}
    assert sorted(by_key) == ["a.png", "img000.png", "img001.png", "quiet.png"]
    assert by_key["img001.png"].caption == "from a .caption file"
    assert by_key["a.png"].caption == "tar caption"
    assert (by_key["a.png"].width, by_key["a.png"].height) == (64, 96)
    assert by_key["a.png"].load_image().size == (64, 96)
    assert by_key["quiet.png"].caption == "" and report.empty_captions == 1
    skipped = "\n".join(report.skipped)
    assert "broken.jpg: not a readable image" in skipped
    assert "b.webp: not a readable image" in skipped
    assert "shard-001.tar: not a readable tar shard" in skipped
    assert "no caption" in caplog.text


def test_no_images_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no usable images"):
        scan(tmp_path / "empty")


def test_buckets_fit_the_area_and_match_aspect() -> None:
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)
    assert nearest_bucket(1080, 1920, buckets) == (384, 640)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([(64, 64), (64, 128), (128, 64)]), min_size=1, max_size=40),
    batch=st.integers(1, 6),
    epoch=st.integers(0, 3),
    peers=st.integers(1, 4),
)
def test_every_image_trains_once_per_epoch(sizes: list[tuple[int, int]], batch: int,
                                           epoch: int, peers: int) -> None:
    seen: list[int] = []
    for peer in range(peers):
        for plan in plan_epoch(sizes, batch, 5, epoch, peer, peers):
            assert 1 <= len(plan.indices) <= batch
            assert all(sizes[i] == plan.bucket for i in plan.indices)
            seen.extend(plan.indices)
    assert sorted(seen) == list(range(len(sizes)))


def test_shards_of_one_bucket_make_up_the_big_batch() -> None:
    sizes = [(64, 64)] * 12
    whole = plan_epoch(sizes, 4, 9, 0)
    halves = [plan_epoch(sizes, 2, 9, 0, i, 2) for i in range(2)]
    for big, a, b in zip(whole, *halves, strict=True):
        assert sorted(big.indices) == sorted(a.indices + b.indices)


def test_schedule_is_a_function_of_the_global_step(tmp_path: Path) -> None:
    def config(name: str, warmup: int = 10):  # type: ignore[no-untyped-def]
        return tiny_run(tmp_path, training={"max_steps": 110},
                        optimizer={"lr": 1.0}, schedule={"name": name, "warmup_steps": warmup,
                                                         "min_lr_ratio": 0.1})

    assert lr_at(0, config("constant")) == 1.0
    warm = config("constant_with_warmup")
    assert [lr_at(s, warm) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    linear = config("linear")
    assert lr_at(10, linear) == pytest.approx(1.0)
    assert lr_at(60, linear) == pytest.approx(0.55)
    assert lr_at(110, linear) == pytest.approx(0.1)
    cosine = config("cosine", 0)
    assert lr_at(55, cosine) == pytest.approx(0.55)
    assert lr_at(110, cosine) == pytest.approx(0.1)
