"""An in-memory loader: the whole split as one uint8 tensor on the training device.

The tutorials' way (a Dataset, PIL transforms per image, a DataLoader with worker
processes) spends most of its time in Python, one image at a time. Here, as in
airbench, the split lives on the device as a single uint8 tensor and every step
augments a whole batch with a handful of tensor operations: random crop with zero
padding, horizontal flip, optional cutout, then normalisation.

Randomness comes from a CPU generator seeded from ``(seed, epoch)``, so an epoch's
order and augmentations are the same whatever the device and whether or not the run
was resumed in between.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from resnet.config import AugmentParams

__all__ = ["DeviceLoader", "augment_batch"]


def _random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Crop each image at its own random offset from a zero-padded copy (torchvision's RandomCrop)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    # unfold gives every (H, W) window of the padded batch; pick one per image.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2p+1, 2p+1, H, W), a view
    return windows[torch.arange(n, device=x.device), :, oy, ox]


def _random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _cutout(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Zero a size x size square per image, centred anywhere, clipped at the border (DeVries & Taylor)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
    y0, x0 = cy - size // 2, cx - size // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_rows = (ys >= y0[:, None]) & (ys < (y0 + size)[:, None])  # (N,H)
    in_cols = (xs >= x0[:, None]) & (xs < (x0 + size)[:, None])  # (N,W)
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(mask[:, None], 0.0)


def augment_batch(x: Tensor, augment: AugmentParams, gen: torch.Generator) -> Tensor:
    """Crop and flip an unnormalised float batch (N, C, H, W); cutout comes after normalisation."""
    if augment.crop_padding > 0:
        x = _random_crop(x, augment.crop_padding, gen)
    if augment.flip:
        x = _random_flip(x, gen)
    return x


class DeviceLoader:
    """Batches of a split held in memory on ``device``.

    Args:
        images: uint8 (N, H, W, C) array or tensor.
        labels: int (N,) array or tensor.
        batch_size: images per batch.
        mean, std: per-channel normalisation on the 0..1 scale.
        device: where the data lives and batches are produced.
        train: shuffle, augment and drop the last partial batch (constant batch
            size keeps BatchNorm statistics sane); otherwise fixed order, every image.
        augment: what to apply when ``train`` (None = no augmentation).
        seed: base seed for shuffling and augmentation; see :meth:`set_epoch`.
        channels_last: emit batches in channels_last memory format.
    """

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        train: bool = False,
        augment: AugmentParams | None = None,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("cannot load an empty split")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        # NCHW once, up front: per-batch work is then pure indexing.
        self.images = images.permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        channels = self.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels} channels")
        # x/255 then (x - mean)/std, folded into one multiply-add.
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self.batch_size = batch_size
        self.train = train
        self.augment = augment if train else None
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train and n >= self.batch_size else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentations the next iteration produces."""
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        return gen

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        gen = self._generator()
        if self.train:
            order = torch.randperm(n, generator=gen).to(self.device)
        else:
            order = None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else sl
            x = (self.images.index_select(0, idx) if order is not None else self.images[idx]).float()
            if self.augment is not None:
                x = augment_batch(x, self.augment, gen)
            x = x * self._scale + self._shift
            if self.augment is not None and self.augment.cutout > 0:
                # After normalisation, so the square is the mean colour (0), as in the paper.
                x = _cutout(x, self.augment.cutout, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
