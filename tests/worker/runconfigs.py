"""Run configs for tests: a tiny full fine-tune at 64 px."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dandelion_p2p.runconfig.schema import RunConfig, from_dict


def tiny_run(base: Path, **sections: dict[str, Any]) -> RunConfig:
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"base": str(base)},
        "training": {"method": "full", "resolution": 64, "bucket_min": 64, "bucket_max": 128,
                     "batch_size": 2, "max_steps": 6, "seed": 7},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "sync": {"local_steps": 3},
        # Test peers on one machine reach a round within about a tenth of a second of each
        # other (an early one keeps looking for a late one): a short gathering window suffices.
        "averaging": {"codec": "none", "gather_window": 0.3},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
    }
    for key, values in sections.items():
        if isinstance(data.get(key), dict):
            data[key] = {**data[key], **values}
        else:
            data[key] = values
    return from_dict(data)
