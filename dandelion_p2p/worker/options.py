"""How one worker process trains: its data, folders, device and memory settings (the run
config says what the swarm trains; these are this machine's choices)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerOptions:
    data: Path | None
    """A local folder of images; None: chunks leased from the run's dataset servers."""
    work_dir: Path
    device: str = "auto"
    mixed_precision: str = "auto"
    """auto: bf16 on a GPU that has it, else fp16 on a GPU, none on the CPU."""
    attention: str = "sdpa"
    gradient_checkpointing: bool = True
    eight_bit_adam: bool = True
    micro_batch: int = 0
    shard: tuple[int, int] | None = None
    """(index, count): train only every count-th sample of each epoch's order."""
    stop_at: int = 0
    """Stop at this global step (0: the run's max_steps)."""
    export: bool = True
    follow_symlinks: bool = False
    """Train also on files that symlinks in ``data`` lead to outside it."""
