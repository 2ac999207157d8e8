"""Real images and packed datasets for the dataset tests."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from PIL import Image

from dandelion_p2p.dataset.client import DatasetClient
from dandelion_p2p.dataset.leases import LeaseBook
from dandelion_p2p.dataset.manifest import Manifest
from dandelion_p2p.dataset.pack import pack
from dandelion_p2p.dataset.server import DatasetServer
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.runconfig.admission import AdmissionConfig
from dandelion_p2p.runconfig.schema import DatasetConfig

RUN_TOML = """\
name = "{name}"

[model]
base = "tiny-sd"

[optimizer]
lr = {lr}

[dataset]
lease_seconds = {lease_seconds}
max_leases_per_peer = 2
"""


def image_bytes(seed: int, size: int = 96, fmt: str = "PNG") -> bytes:
    """A noise image: incompressible, so its size (and so chunk counts) is predictable."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def image_folder(root: Path, count: int, *, first_seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"img{i:03d}.png").write_bytes(image_bytes(first_seed + i))
        (root / f"img{i:03d}.txt").write_text(f"a noise picture number {i}\n")
    return root


def packed_dataset(tmp: Path, owner: Identity, images: int = 8) -> tuple[Path, Manifest]:
    """``images`` noise images packed into 72 KiB chunks (two images per chunk)."""
    src = image_folder(tmp / "src", images)
    out = tmp / "packed"
    manifest, _ = pack(src, out, owner, chunk_bytes=72 * 1024)
    return out, manifest


def run_toml(name: str = "tiny", lr: float = 1e-4, lease_seconds: float = 60.0) -> str:
    return RUN_TOML.format(name=name, lr=lr, lease_seconds=lease_seconds)


async def serve_dataset(
    node: SwarmNode,
    run: str,
    manifest: Manifest,
    data_dir: Path,
    book_path: Path,
    config: DatasetConfig | None = None,
    admission: AdmissionConfig | None = None,
) -> DatasetServer:
    """``node`` serves the packed dataset in ``data_dir`` for ``run``, announced in the DHT;
    its lease book (``server.book``) is the caller's to close."""
    book = LeaseBook(book_path, manifest, run)
    server = DatasetServer(run, manifest, data_dir, book, config or DatasetConfig(),
                           host=node.host, records=node.records, scores=node,
                           admission=admission)
    server.install()
    assert await server.announce() >= 1
    return server


def dataset_client(node: SwarmNode, run: str, cache_dir: Path, **options: Any) -> DatasetClient:
    """A dataset client of ``run`` over ``node``'s ports, as the daemon wires one."""
    return DatasetClient(run, cache_dir, host=node.host, signer=node.identity,
                         records=node.records, links=node, scores=node, **options)
