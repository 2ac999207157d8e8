"""Third-party output that says nothing to a person running a worker, turned off at start.

- transformers warns on every start that its image processors fall back to PIL without
  torchvision: the trainer never uses an image processor (the VAE reads images), so the
  fallback changes nothing here. Only that message is dropped; every other warning stays.
- diffusers and transformers draw progress bars while loading a model's components from
  disk, which take a second and interleave with the worker's own bar and log lines.
"""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed)"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def quiet_third_party() -> None:
    """Call before the trainer loads its model (idempotent)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
