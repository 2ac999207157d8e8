"""The console progress bar of a worker: steps of the run, it/s, ETA, loss, learning rate,
the last validation loss and the state of the last averaging round.

Shown only on a terminal (a worker the daemon starts writes to a pipe, and its log lines go
to the web UI instead); while it is shown, log lines are printed above it rather than through
it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import IO, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dandelion_p2p.worker.link import SyncOutcome


def round_text(outcome: SyncOutcome) -> str:
    """What the last averaging round did, in a few words."""
    head = f"round {outcome.round}"
    if outcome.stopping:
        return f"{head}: cut short"
    if outcome.behind:
        return f"{head}: behind, catching up"
    if not outcome.averaged:
        if outcome.members > 1:
            return f"{head}: not averaged ({outcome.members} peers)"
        return f"{head}: alone"
    return (f"{head}: {outcome.members} peers, {100 * outcome.fraction_averaged:.0f}% averaged,"
            f" {outcome.seconds:.1f} s")


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if value and abs(value) < 1e-3 else f"{value:.4f}"


class ConsoleProgress:
    """A tqdm bar over the run's global steps. ``enabled=None``: only when ``file`` is a
    terminal."""

    def __init__(self, total: int, file: IO[str] | None = None,
                 enabled: bool | None = None) -> None:
        self.file = file if file is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.file, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = total
        self._bar: Any = None
        self._redirect = contextlib.ExitStack()
        self.fields: dict[str, str] = {}

    def _open(self, initial: int) -> Any:
        if self._bar is None and self.enabled:
            self._bar = tqdm(total=self.total, initial=initial, file=self.file, desc="training",
                             unit="it", dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
            # Log lines go above the bar, not through it.
            self._redirect.enter_context(logging_redirect_tqdm())
        return self._bar

    def step(self, global_step: int, loss: float, lr: float | None) -> None:
        # The bar starts at the first step taken here: it/s and ETA count from then on,
        # not from the model loading before it.
        bar = self._open(global_step)
        if bar is None:
            return
        self.fields["loss"] = _number(loss)
        if lr is not None:
            self.fields["lr"] = f"{lr:.2e}"
        self._postfix(bar, refresh=False)  # drawn with the step's count, once
        if global_step > bar.n:
            bar.update(global_step - bar.n)
        else:  # the first step here, or moved back (the swarm's state replaced ours)
            bar.n = global_step
            bar.refresh()

    def note(self, key: str, text: str) -> None:
        """A field shown after the numbers (``val``: validation loss, ``round``: the last
        round), kept until replaced."""
        self.fields[key] = text
        if self._bar is not None:
            self._postfix(self._bar)

    def _postfix(self, bar: Any, refresh: bool = True) -> None:
        parts = [f"{k} {self.fields[k]}" for k in ("loss", "lr", "val") if k in self.fields]
        if "round" in self.fields:
            parts.append(self.fields["round"])  # "round 3: 4 peers, ..." names itself
        bar.set_postfix_str(", ".join(parts), refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()
