"""A byzantine ``dandelion-p2p worker`` for ``quality.py``: test-only, never part of the product.

It runs the ordinary worker CLI, but just before every sync it scales what the worker hands its
daemon (the gradient in gradient mode, the pseudo-gradient in local-steps mode) by
``QUALITY_BYZANTINE_SCALE`` (default -1000: sign-flipped and 1000 times too large). The daemon,
the network and the other peers are the real ones; only this peer lies.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def main() -> None:
    from dandelion_p2p.worker import link

    scale = float(os.environ.get("QUALITY_BYZANTINE_SCALE", "-1000"))
    original = link.DaemonLink.sync

    def lying_sync(self: link.DaemonLink, round_: int, weight: float, kind: str) -> Any:
        shared = getattr(self, "_shared", None)
        if shared is not None:
            shared.array *= scale
        return original(self, round_, weight, kind)

    link.DaemonLink.sync = lying_sync  # type: ignore[method-assign]
    from dandelion_p2p.cli import main as cli_main

    sys.argv = ["dandelion-p2p", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
