"""What every scan of images checks, and the limits it applies (``dataset pack`` and the
worker's folder scan alike).

``Image.open`` reads only an image's header, so size and format come without decoding a
pixel. The pixel limit is checked there: an image over it is refused before anything
allocates room for its pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""Files both the packer and the worker's folder scan take as images."""
MAX_PIXELS = 64 * 1024 * 1024
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class OverPixelLimit(ValueError):
    """The header says the image has more than ``MAX_PIXELS`` pixels."""


@dataclass(frozen=True, slots=True)
class ImageHeader:
    format: str
    """Pillow's name for it: ``JPEG``, ``PNG``, ``WEBP``, ..."""
    width: int
    height: int


def read_header(data: bytes) -> ImageHeader:
    """The header of the image in ``data``; raises ``OverPixelLimit``, or ``ValueError``
    saying why it is not an image Pillow can read."""
    return _inspect(data, decode=False)


def read_and_decode(data: bytes) -> ImageHeader:
    """``read_header``, then one decode of the pixels to find truncated or damaged data
    (``ValueError``); an image over the pixel limit is refused before it is decoded.

    A JPEG is decoded at 1/8 scale: every byte of its stream is still read (so truncation is
    found) for about a quarter of the work of a full decode.
    """
    return _inspect(data, decode=True)


def _inspect(data: bytes, decode: bool) -> ImageHeader:
    # One Image.open for header and decode: for small images opening costs as much as
    # decoding.
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 Mpixel and refuses from twice that; our own, lower limit
            # is checked below, with the image's size in the message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                header = ImageHeader(image.format or "", image.width, image.height)
                if header.width * header.height > MAX_PIXELS:
                    raise OverPixelLimit(f"{header.width}x{header.height} is over the limit "
                                         f"of {MAX_PIXELS} pixels")
                if decode:
                    if header.format == "JPEG":
                        image.draft(image.mode, (max(1, header.width // 8),
                                                 max(1, header.height // 8)))
                    image.load()
    except OverPixelLimit:
        raise
    except Image.DecompressionBombError as exc:
        raise OverPixelLimit(f"over the limit of {MAX_PIXELS} pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ValueError("not an image format Pillow can read") from None
    except Exception as exc:  # Pillow raises many unrelated types on bad input
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    return header
