"""Image decoding for training: any Pillow mode to 8-bit RGB, with size limits and clear failures.

``load_image`` (a file) and ``decode_image`` (bytes, e.g. from a tar shard) return an RGB
``PIL.Image``; every failure (missing, truncated, corrupt, not an image, too large) is a
:class:`BadSample` whose message names the image and the reason, so the data pipeline can count and
skip it. ``to_tensor`` turns the image into the uint8 ``(3, size, size)`` tensor the loaders batch.

EXIF orientation tags are not applied (as in ALBEF's pipeline, which opens images with Pillow and
converts them to RGB).
"""

from __future__ import annotations

import io
import warnings
from typing import IO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE = (255, 255, 255, 255)


class BadSample(Exception):
    """A sample that cannot be used (unreadable image, empty caption); the message is "path: reason"."""


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) grey images -> 8-bit RGB.

    ``I;16*`` and ``I`` are scaled from [0, 65535] to [0, 255] (Pillow opens 16-bit grey PNG/TIFF
    files in these modes; ``I`` values outside that range are clipped). ``F`` images whose values all
    lie in [0, 1] are scaled by 255, others are taken as [0, 255] and clipped; NaN becomes 0.
    """
    values = np.asarray(img).astype(np.float32)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
    else:
        values = values / 257.0  # 65535 / 257 = 255 exactly
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from any mode: transparency (an alpha band, or a palette or grey/RGB
    ``transparency`` entry) is composited onto white; 16-bit and float grey are rescaled, not clipped."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # also a copy when the image is already RGB


def _decode(source: str | IO[bytes], name: str, max_pixels: int, draft_size: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own max_pixels check replaces Pillow's warning; its hard limit (an error) still applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size  # from the header: no pixel data decoded yet
                if width * height > max_pixels:
                    raise BadSample(
                        f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                    )
                if draft_size > 0 and img.format == "JPEG":
                    # decode at a reduced DCT scale that keeps both sides >= draft_size (much faster)
                    img.draft("RGB", (draft_size, draft_size))
                img.load()  # the full decode: truncated and corrupt data fail here
                return to_rgb(img)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample(f"{name}: file not found") from None
    except IsADirectoryError:
        raise BadSample(f"{name}: is a directory, not an image file") from None
    except Image.DecompressionBombError as exc:
        raise BadSample(f"{name}: too large (Pillow's decompression-bomb limit): {exc}") from None
    except UnidentifiedImageError:
        raise BadSample(f"{name}: not an image Pillow can read") from None
    except Exception as exc:  # any decoder failure makes this one sample unusable
        raise BadSample(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from None


def load_image(path: str, max_pixels: int, draft_size: int = 0) -> Image.Image:
    """Read an image file as 8-bit RGB.

    Args:
        path: the image file.
        max_pixels: images with width * height above this are rejected from the header, before
            their pixels are decoded.
        draft_size: if > 0, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
            both sides >= draft_size; pass the size the image is resized to next. 0 = full decode.

    Returns:
        An RGB ``PIL.Image`` (see :func:`to_rgb` for the mode conversions).

    Raises:
        BadSample: "path: reason" for a missing, truncated, corrupt, non-image or too-large file.
    """
    return _decode(path, path, max_pixels, draft_size)


def decode_image(data: bytes, name: str, max_pixels: int, draft_size: int = 0) -> Image.Image:
    """Like :func:`load_image` for encoded bytes (e.g. a tar shard member); ``name`` is used in errors."""
    return _decode(io.BytesIO(data), name, max_pixels, draft_size)


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB image -> uint8 tensor ``(3, size, size)``, resized with Pillow's bicubic filter
    (antialiased when shrinking).

    The aspect ratio is squashed to a square on purpose: the device-side random resized crop
    (:class:`softmask.data.transforms.TrainAugment`) follows and re-crops it with a random scale and
    aspect ratio, and fixed-size tensors are what lets the loaders batch images cheaply.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.array(img, dtype=np.uint8)  # (size, size, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
