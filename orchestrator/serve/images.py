"""The image check of ``smn serve``'s requests, without torch: the HTTP gateway (:mod:`orchestrator.serve.gateway`)
refuses a body that is not a JPEG or PNG image before any replica sees it; the model replicas decode the same way
(:mod:`orchestrator.serve.model`)."""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "decode_image"]


class ImageError(ValueError):
    """Bytes that are not a readable JPEG or PNG image."""


def decode_image(data: bytes, formats: Sequence[str] = ("JPEG", "PNG")) -> Image.Image:
    """An RGB ``PIL.Image`` from the bytes of a JPEG or PNG file.

    Raises:
        ImageError: empty bytes, bytes PIL cannot read, or an image of another format (names it).
    """
    if not data:
        raise ImageError("the request body is empty; send the bytes of a JPEG or PNG image")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in formats:
            raise ImageError(f"image format {fmt!r} is not accepted; allowed: {', '.join(formats)}")
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"the body ({len(data)} bytes) is not a readable JPEG or PNG image "
                         f"({type(exc).__name__})") from None
