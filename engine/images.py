"""Decoding request pictures into RGB arrays, with a clear error for bytes that are not a picture."""

from __future__ import annotations

import io

import numpy as np


class ImageDecodeError(ValueError):
    """The bytes of a request picture do not decode."""


def decode_image(data: bytes, image_id: str = "?") -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 array [height, width, 3]."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError(f"image {image_id} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"image {image_id} does not decode: {exc}") from None
