"""Decoding an image folder's files to one uint8 array, by the path of :mod:`resnet.preprocess`.

Pixels are exactly what :func:`resnet.preprocess.from_bytes` gives for each file
(RGB, resize, grayscale if asked); JPEGs are decoded by torchvision in batches, which
gives PIL's pixels (both are libjpeg-turbo) several times faster. A JPEG goes to
torchvision only when its frame header gives a size within :data:`resnet.preprocess.MAX_PIXELS`;
any other file goes to :func:`resnet.preprocess.decode`, which refuses what is over the limit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resnet import preprocess
from resnet.data.errors import DataError
from resnet.utils import progress_enabled

__all__ = ["decode_images"]

_CHUNK = 1024  # images per torchvision call and per progress update
_JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic): not C4 (DHT), C8 (JPG), CC (DAC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def decode_images(
    names: list[str],
    blobs: Mapping[str, bytes | None],
    where: Path,
    image_size: int | None,
    channels: int,
    *,
    desc: str = "",
    progress: bool = True,
) -> np.ndarray:
    """Decode the named members to one uint8 (N, H, W, channels) array, in the order given.

    Every image is resized to ``image_size`` x ``image_size`` when given; otherwise
    they must all have the same size (the error names an odd one).
    """
    from tqdm import tqdm

    parts: list[np.ndarray] = []
    first: tuple[str, tuple[int, ...]] | None = None
    shown = progress and progress_enabled()
    with tqdm(total=len(names), desc=f"decoding {desc}", unit="img", disable=not shown) as bar:
        for start in range(0, len(names), _CHUNK):
            chunk = names[start : start + _CHUNK]
            rgb = _decode_rgb([blobs[n] or b"" for n in chunk], chunk, where)
            if image_size is None:
                first = first or (chunk[0], rgb[0].shape)
                _check_same_size(chunk, rgb, first, where)
            parts.append(preprocess.batch_pixels(rgb, image_size, channels))
            bar.update(len(chunk))
    if not parts:
        return np.zeros((0, image_size or 0, image_size or 0, channels), dtype=np.uint8)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _check_same_size(names: list[str], rgb: list[np.ndarray], first: tuple[str, tuple[int, ...]], where: Path) -> None:
    for name, image in zip(names, rgb, strict=True):
        if image.shape != first[1]:
            (h, w), (fh, fw) = image.shape[:2], first[1][:2]
            raise DataError(
                f"{where}: images differ in size ({name} is {w}x{h}, {first[0]} is {fw}x{fh}); "
                f"set data.image_size to resize them all"
            )


def _decode_rgb(data: list[bytes], names: list[str], where: Path) -> list[np.ndarray]:
    """uint8 RGB (H, W, 3) at the native size: JPEGs by torchvision where it can, the rest by PIL."""
    out: list[Any] = [None] * len(data)
    # Only JPEGs whose header size is within the limit; PIL decodes or refuses the rest, naming the size.
    jpeg = [i for i, d in enumerate(data) if d[:3] == _JPEG_MAGIC and _jpeg_pixels(d) <= preprocess.MAX_PIXELS]
    if jpeg:
        decoded = _decode_jpeg_batch([data[i] for i in jpeg])
        for i, t in zip(jpeg, decoded or [None] * len(jpeg), strict=True):
            if t is not None:
                out[i] = t.permute(1, 2, 0).numpy()
    for i, name in enumerate(names):
        if out[i] is None:
            try:
                out[i] = preprocess.decode(data[i])
            except preprocess.ImageError as e:
                raise DataError(f"{where}: {name}: {e}; remove or replace the file") from None
    return out


def _jpeg_pixels(data: bytes) -> float:
    """Width x height from a JPEG's frame header, read before decoding; inf if it has none before the scan."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_SOF:
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return width * height if width and height and i + 9 <= n else float("inf")
        elif marker in (0xDA, 0xD9):  # start of scan, end of image: no frame header
            break
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return float("inf")


def _decode_jpeg_batch(blobs: list[bytes]) -> list[Any] | None:
    """Decode JPEGs with torchvision in one call: CHW uint8 tensors, None where it fails (PIL then tries).

    One call for many images: 34 us an image here against 120 us through a per-image
    Python wrapper. Returns None when torchvision is unavailable.
    """
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision is a dependency, but PIL alone is enough
        return None
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders (moving to torchcodec); when they are gone the
        # import above fails and PIL does the work.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB)
        except RuntimeError:  # one odd file (CMYK, corrupt) fails the call: go one by one
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB))
                except RuntimeError:
                    out.append(None)
    return [t if t is not None and t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3 else None for t in out]
