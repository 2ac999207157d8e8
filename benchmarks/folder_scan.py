"""How long the worker's folder scan takes: the first scan, and a re-scan with the scan cache.

Run: .venv/bin/python benchmarks/folder_scan.py [--images N] [--dir DIR]

Makes N captioned 64x64 PNGs (each with different pixels, about 200 bytes) in a temporary
folder, or in DIR (kept, and reused by later runs: writing 100,000 images and deleting them
again take minutes), then times a scan without a cache, a first scan into an empty cache, and
a re-scan of the unchanged folder with that cache. Writing the images is not timed.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from PIL import Image

from dandelion_p2p.worker.data import scan

PER_FOLDER = 1000
"""Images per subfolder, as large datasets are usually split."""


def make_images(root: Path, count: int) -> None:
    for i in range(count):
        folder = root / f"part{i // PER_FOLDER:04d}"
        image = folder / f"img{i:07d}.png"
        if image.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        # Two pixels carry the index: every image (and so every hash) differs.
        pixels = Image.new("RGB", (64, 64), (40, 90, 160))
        pixels.putpixel((0, 0), (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF))
        pixels.putpixel((63, 63), (i % 251, 7, 7))
        out = io.BytesIO()
        pixels.save(out, format="PNG")
        image.write_bytes(out.getvalue())
        image.with_suffix(".txt").write_text(f"a blue square number {i}")
        if i and i % 20_000 == 0:
            print(f"  wrote {i} images", flush=True)


def timed_scan(root: Path, cache: Path | None) -> tuple[float, int]:
    start = time.perf_counter()
    report = scan(root, cache_file=cache)
    return time.perf_counter() - start, len(report.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, help="Keep the images here (default: a temp dir).")
    parser.add_argument("--skip-uncached", action="store_true",
                        help="Do not time the scan without a cache.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="folder-scan-") as tmp:
        root = args.dir or Path(tmp) / "images"
        start = time.perf_counter()
        make_images(root, args.images)
        print(f"{args.images} images in {root} ({time.perf_counter() - start:.0f} s to write)")
        rows = []
        if not args.skip_uncached:
            rows.append(("no cache", *timed_scan(root, None)))
        cache = Path(tmp) / "cache" / "scan.sqlite"
        rows.append(("first scan, cache empty", *timed_scan(root, cache)))
        rows.append(("re-scan, cache filled", *timed_scan(root, cache)))
        for name, seconds, found in rows:
            print(f"{name:26s} {seconds:8.1f} s  {found} images "
                  f"({seconds / max(1, found) * 1e6:.0f} us per image)")
        print(f"cache file: {cache.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
