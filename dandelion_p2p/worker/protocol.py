"""Constants shared by the worker and the daemon's sync service (no torch here).

The control messages themselves travel as methods on the daemon's control socket (see
``protocol/worker.md``); this module names them and bounds their fields.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1

HELLO = "worker.hello"
BUFFER = "worker.buffer"
PROGRESS = "worker.progress"
SYNC = "worker.sync"
CATCH_UP = "worker.catch_up"

WORKER_STATES = ("starting", "training", "syncing", "stopping", "stopped")
MAX_DETAIL = 2000
MAX_ELEMENTS = 8 * 1024**3 // 4
"""The largest vector the shared buffer holds: 8 GiB of float32 (an SDXL UNet is 10.3 GB in
fp32, so a full SDXL fine-tune syncs in lower precision or as LoRA)."""
