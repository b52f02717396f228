"""Images in requests: base64 text or raw bytes in, an image model's pixel_values out, errors naming the image.

Used by service.inference for /predict (JSON and multipart) and V2 infer; a BadImage becomes an error
naming the image there. Decoding runs in a thread-pool thread, so the batcher's worker only runs the
model on the pixels.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from finetune_core.errors import DataError

from .schemas import MAX_IMAGE_BYTES

_POSITION = re.compile(r"image (\d+): (.*)", re.S)


class BadImage(Exception):
    """An image the service cannot use: `reason` is a metrics label (base64, too_large, undecodable)."""

    def __init__(self, index: int, reason: str, message: str):
        super().__init__(message)
        self.index, self.reason, self.message = index, reason, message


def from_base64(items: Sequence[str]) -> list[bytes]:
    """Encoded images from base64 strings (a `data:image/...;base64,` prefix and line breaks are allowed)."""
    out = []
    for index, text in enumerate(items):
        if text.startswith("data:"):
            text = text.partition(",")[2]
        text = "".join(text.split())
        if len(text) // 4 * 3 > MAX_IMAGE_BYTES:
            raise too_large(index, len(text) // 4 * 3)
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as err:
            raise BadImage(index, "base64", f"not valid base64 ({err}); send the image file's bytes base64-encoded") from None
    return out


def too_large(index: int, size: int) -> BadImage:
    return BadImage(index, "too_large", f"{size / 2**20:.1f} MiB; at most {MAX_IMAGE_BYTES / 2**20:g} MiB per image")


def decode(predictor, images: Sequence, base64_text: bool = False,
           on_encoded: Callable[[int], None] = lambda size: None) -> tuple[np.ndarray, float]:
    """(pixel_values, seconds taken) for base64 strings, encoded images or HxWx3 uint8 arrays.

    Each encoded image must fit MAX_IMAGE_BYTES; `on_encoded` sees its size. BadImage names the first bad one.
    """
    started = time.perf_counter()
    if base64_text:
        images = from_base64(images)
    for index, image in enumerate(images):
        if isinstance(image, bytes):
            if len(image) > MAX_IMAGE_BYTES:
                raise too_large(index, len(image))
            on_encoded(len(image))
    try:
        pixels = predictor.pixels(images)
    except DataError as err:
        found = _POSITION.match(str(err))
        if found is None:
            raise
        raise BadImage(int(found.group(1)), "undecodable", found.group(2)) from None
    return pixels, time.perf_counter() - started
