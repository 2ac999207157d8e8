"""Third-party output that says nothing to a person running a worker, turned off at start.

- transformers warns on every start that its image processors fall back to PIL without
  torchvision: the trainer never uses an image processor (the VAE reads images), so the
  fallback changes nothing here.
- bitsandbytes warns on import, on machines without the optional ``kernels`` package, that
  its CPU kernel for 4-bit matrix products could not be loaded: the trainer uses bitsandbytes
  for 8-bit AdamW only and never runs a 4-bit layer.
- diffusers and transformers draw progress bars while loading a model's components from
  disk, which take a second and interleave with the worker's own bar and log lines.

Only those messages are dropped; every other warning of those loggers stays.
"""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed)"
BITSANDBYTES_4BIT_KERNEL = "Failed to load CPU gemm_4bit_forward"

DROPPED: dict[str, str] = {
    "transformers.utils.import_utils": TORCHVISION_FALLBACK,
    "bitsandbytes.backends.cpu.ops": BITSANDBYTES_4BIT_KERNEL,
}
"""Logger name -> the text of the one message dropped from it."""


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Call before the trainer imports bitsandbytes or loads its model (idempotent)."""
    for name, text in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(text))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
