"""Image -> the model's input pixels: the one path for the split stage, ``resnet.predict`` and the pyfunc model.

The order is the split stage's, and everything that feeds a model follows it:

1. RGB: decoded with PIL's ``convert("RGB")`` (alpha dropped, palettes expanded);
   a grayscale image is replicated to three equal channels;
2. resize to the model's size with PIL's bilinear filter (antialiased when
   shrinking; the aspect ratio is not kept);
3. grayscale (PIL's ITU-R 601-2 luma, in its integer arithmetic) if the model
   takes one channel.

Resizing before the grayscale conversion matters: the two orders round differently.
A grayscale image survives steps 1 and 3 unchanged (the luma of three equal channels
is that channel), so a 1-channel model sees exactly what it was trained on.

Untrusted files: :func:`decode` refuses an image of more than :data:`MAX_PIXELS` pixels
from its header, before decoding it (a decompression bomb: a few KB that decode to GBs).

Light on purpose (numpy, PIL): the pyfunc model ships this package's code.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "check_pixels",
    "Size",
    "as_size",
    "decode",
    "to_rgb",
    "resize",
    "to_grayscale",
    "model_pixels",
    "batch_pixels",
    "from_bytes",
]

#: A target size: an int for a square, (height, width), or None to keep the image's own size.
Size = int | Sequence[int] | None

#: The largest image decoded, in pixels: PIL's own warning threshold (2**30 // 4 // 3, a 256 MiB RGB
#: buffer, about 9459 x 9459), far above any camera's photo, refused here instead of warned about.
MAX_PIXELS = 89_478_485


class ImageError(ValueError):
    """An image that cannot be decoded, or an array that is not a uint8 image with 1 or 3 channels."""


def as_size(size: Size) -> tuple[int, int] | None:
    """``32`` -> ``(32, 32)``; ``[32, 24]`` -> ``(32, 24)`` (height, width); None and ``[]`` -> None."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) == 0:
        return None
    if len(size) != 2:
        raise ImageError(f"image size {size!r} must be an int or (height, width)")
    return int(size[0]), int(size[1])


def _too_large(pixels: int, dims: str = "") -> ImageError:
    return ImageError(
        f"image {dims}({pixels:,} pixels) is over the limit of {MAX_PIXELS:,} pixels (a decompression bomb, "
        f"or far larger than a model needs); shrink it below {MAX_PIXELS // 1_000_000} megapixels"
    )


def check_pixels(width: int, height: int) -> None:
    """Refuse an image of ``width`` x ``height`` over :data:`MAX_PIXELS` (from its header, before decoding)."""
    if width * height > MAX_PIXELS:
        raise _too_large(width * height, f"{width}x{height} ")


def decode(data: bytes) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) to uint8 RGB (H, W, 3) with PIL; over MAX_PIXELS is refused."""
    try:
        with warnings.catch_warnings():
            # PIL warns past its MAX_IMAGE_PIXELS (and raises past twice that); check_pixels refuses instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(*im.size)
                return np.array(im.convert("RGB"))  # a writable copy (asarray's is read-only)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # past PIL's own hard limit: it gives no dimensions
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise (_too_large(int(found[1])) if found else ImageError(f"cannot decode image: {e}")) from None
    except UnidentifiedImageError:
        # PIL's message names only its in-memory buffer ("<_io.BytesIO object at 0x...>").
        raise ImageError("cannot decode image: not an image file, or a format PIL cannot read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot decode image: {e}") from None


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ImageError(
            f"expected a uint8 image (H, W, C) with C = 1 (grayscale) or 3 (RGB), got {image.dtype} {image.shape}; "
            f"drop an alpha channel (image[..., :3]) and convert other types to uint8 0..255"
        )


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3); grayscale is replicated (as PIL's convert("RGB"))."""
    image = np.asarray(image)
    _check_image(image)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def resize(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize uint8 (H, W, 3) to ``size`` with PIL's bilinear filter (the split stage's method); no-op if equal."""
    hw = as_size(size)
    if hw is None or image.shape[:2] == hw:
        return image
    return np.array(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) to (..., 1) with PIL's ITU-R 601-2 luma, in PIL's integer arithmetic."""
    rgb = images.astype(np.uint32)
    y = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return y.astype(np.uint8)[..., None]


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ImageError(f"channels={channels!r}: a model takes 1 (grayscale) or 3 (RGB) channels")


def model_pixels(image: np.ndarray, size: Size, channels: int) -> np.ndarray:
    """One decoded image (uint8 (H, W), (H, W, 1) or (H, W, 3)) -> uint8 (h, w, channels) at ``size``."""
    _check_channels(channels)
    rgb = resize(to_rgb(image), size)
    return to_grayscale(rgb) if channels == 1 else rgb


def batch_pixels(images: np.ndarray | Sequence[np.ndarray], size: Size, channels: int) -> np.ndarray:
    """Many images -> uint8 (N, h, w, channels), as :func:`model_pixels` gives one by one.

    ``images``: a uint8 array (N, H, W, C) or (N, H, W), or a sequence of single
    images of any sizes (then ``size`` must be given, or they must agree). Images
    that need no resizing are converted whole, without a Python loop per image.
    """
    _check_channels(channels)
    hw = as_size(size)
    if not isinstance(images, np.ndarray) and len({np.shape(im) for im in images}) == 1:
        images = np.stack(images)  # one size: convert them whole
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):
        if images.dtype != np.uint8 or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise ImageError(
                f"expected uint8 images (N, H, W, C) with C = 1 (grayscale) or 3 (RGB), got {images.dtype} "
                f"{images.shape}; drop an alpha channel (images[..., :3]) and convert other types to uint8 0..255"
            )
        arr = images[..., None] if images.ndim == 3 else images
        if hw is None or arr.shape[1:3] == hw:
            if arr.shape[3] == channels:
                return arr
            return to_grayscale(arr) if channels == 1 else np.repeat(arr, 3, axis=3)
    out = [model_pixels(im, hw, channels) for im in images]
    shapes = {im.shape for im in out}
    if len(shapes) > 1:
        raise ImageError(f"images differ in size ({sorted(shapes)}) and no size to resize them to was given")
    if not out:
        h, w = hw or (0, 0)
        return np.zeros((0, h, w, channels), dtype=np.uint8)
    return np.stack(out)


def from_bytes(data: bytes, size: Size, channels: int) -> np.ndarray:
    """An encoded image -> uint8 (h, w, channels): :func:`decode` then :func:`model_pixels`."""
    return model_pixels(decode(data), size, channels)
