"""An in-memory loader: the whole split as one uint8 tensor on the training device.

The tutorials' way (a Dataset, PIL transforms per image, a DataLoader with worker
processes) spends most of its time in Python, one image at a time. Here, as in
airbench, the split lives on the device as a single uint8 tensor and every step
augments a whole batch with a handful of tensor operations: random crop with zero
padding, horizontal flip (random, or alternating by epoch), optional cutout, then
normalisation.

Randomness comes from a CPU generator seeded from ``(seed, epoch)``, so an epoch's
order and augmentations are the same whatever the device and whether or not the run
was resumed in between. With several processes (resnet.distributed) each one takes its
slice of every global batch, and the slices put together are one process's batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from resnet.config import AugmentParams

__all__ = ["DeviceLoader"]


@dataclass
class _Draws:
    """A global batch's random augmentation choices, drawn once and sliced per process.

    Every process draws the choices for the whole global batch from the same generator
    and applies its own slice, so N processes augment each image exactly as one process
    with the global batch would. The draws come in the order a single batch always drew
    them (crop offsets, flips, cutout centres): one process reproduces earlier runs.
    """

    oy: Tensor | None = None  # crop offsets
    ox: Tensor | None = None
    flip: Tensor | None = None  # bool per image
    cy: Tensor | None = None  # cutout centres
    cx: Tensor | None = None

    @classmethod
    def draw(cls, n: int, size: tuple[int, int], augment: AugmentParams, gen: torch.Generator) -> _Draws:
        d = cls()
        if augment.crop_padding > 0:
            span = 2 * augment.crop_padding + 1
            d.oy, d.ox = torch.randint(0, span, (n,), generator=gen), torch.randint(0, span, (n,), generator=gen)
        if augment.flip is True:  # "alternate" flips are not drawn: DeviceLoader sets them
            d.flip = torch.rand(n, generator=gen) < 0.5
        if augment.cutout > 0:
            d.cy, d.cx = torch.randint(0, size[0], (n,), generator=gen), torch.randint(0, size[1], (n,), generator=gen)
        return d

    def part(self, lo: int, hi: int, device: torch.device) -> _Draws:
        """The draws of images lo..hi of the global batch, on ``device``."""
        return _Draws(*(None if t is None else t[lo:hi].to(device) for t in dataclasses.astuple(self)))


def _random_crop(x: Tensor, padding: int, oy: Tensor, ox: Tensor) -> Tensor:
    """Crop each image at its own offset from a zero-padded copy (torchvision's RandomCrop)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    # unfold gives every (H, W) window of the padded batch; pick one per image.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2p+1, 2p+1, H, W), a view
    return windows[torch.arange(n, device=x.device), :, oy, ox]


def _cutout(x: Tensor, size: int, cy: Tensor, cx: Tensor) -> Tensor:
    """Zero a size x size square per image, centred anywhere, clipped at the border (DeVries & Taylor)."""
    _, _, h, w = x.shape
    y0, x0 = cy - size // 2, cx - size // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_rows = (ys >= y0[:, None]) & (ys < (y0 + size)[:, None])  # (N,H)
    in_cols = (xs >= x0[:, None]) & (xs < (x0 + size)[:, None])  # (N,W)
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(mask[:, None], 0.0)


class DeviceLoader:
    """Batches of a split held in memory on ``device``.

    Args:
        images: uint8 (N, H, W, C) array or tensor.
        labels: int (N,) array or tensor.
        batch_size: images per batch (per process, per micro-batch).
        mean, std: per-channel normalisation on the 0..1 scale.
        device: where the data lives and batches are produced.
        train: shuffle, augment and drop the last partial batch (constant batch
            size keeps BatchNorm statistics sane); otherwise fixed order, every image.
        augment: what to apply when ``train`` (None = no augmentation).
        seed: base seed for shuffling and augmentation; see :meth:`set_epoch`.
        channels_last: emit batches in channels_last memory format.
        rank, world_size, accumulation: with ``train``, this process's share of each global
            batch of ``batch_size * world_size * accumulation`` images. Every process draws
            the same permutation and augmentations; for each optimizer step it yields
            ``accumulation`` micro-batches, disjoint from every other process's. One
            process with the global batch sees the same images, augmented the same way.
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
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
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
        if not 0 <= rank < world_size or accumulation < 1:
            raise ValueError(f"rank {rank} of world size {world_size}, accumulation {accumulation}: out of range")
        shards = world_size * accumulation
        if shards > 1 and (not train or len(images) < batch_size * shards):
            raise ValueError(
                f"{len(images)} images cannot fill one global batch of {batch_size} x {world_size} processes "
                f"x {accumulation} accumulation steps (sharding is for training only); lower train.batch_size"
            )
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
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self._flip_base: Tensor | None = None  # augment.flip "alternate": which half flips in even epochs

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes (the batch size when there is one)."""
        return self.batch_size * self.world_size * self.accumulation

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch (training), or batches (evaluation)."""
        n, g = len(self.labels), self.global_batch
        return n // g if self.train and n >= g else -(-n // g)

    def __len__(self) -> int:
        """Batches this process yields per epoch (micro-batches when accumulating)."""
        return self.steps * self.accumulation

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
        if not self.train:
            for i in range(len(self)):
                sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
                yield self._finish(self.images[sl].float(), None), self.labels[sl]
            return
        gen = self._generator()
        order = torch.randperm(n, generator=gen).to(self.device)
        size = (self.images.shape[2], self.images.shape[3])
        g, b = min(self.global_batch, n), self.batch_size
        for step in range(self.steps):
            batch = order[step * g : (step + 1) * g]
            draws = _Draws.draw(len(batch), size, self.augment, gen) if self.augment is not None else None
            if draws is not None and self.augment.flip == "alternate":
                draws.flip = self._alternate_flips(batch)
            for micro in range(self.accumulation):
                lo = (micro * self.world_size + self.rank) * b
                hi = min(lo + b, len(batch))
                idx = batch[lo:hi]
                part = draws.part(lo, hi, self.device) if draws is not None else None
                yield self._finish(self.images.index_select(0, idx).float(), part), self.labels[idx]

    def _alternate_flips(self, batch: Tensor) -> Tensor:
        """Flips that alternate by epoch: each image is flipped in every other epoch (airbench).

        A random half of the images is flipped in even epochs, the other half in odd
        ones, so any two consecutive epochs show every image both ways: random flips
        would show about a quarter of them the same way twice. The half is drawn once
        per run, from train.seed alone.
        """
        if self._flip_base is None:
            gen = torch.Generator()
            gen.manual_seed(self.seed * 1_000_003 - 1)  # not an epoch's seed (those are seed * 1_000_003 + epoch)
            self._flip_base = torch.rand(len(self.labels), generator=gen) < 0.5
        return self._flip_base[batch.cpu()] ^ bool(self.epoch % 2)

    def _finish(self, x: Tensor, draws: _Draws | None) -> Tensor:
        """Augment (crop, flip), normalise, cut out and lay out one float batch."""
        if draws is not None and draws.oy is not None:
            x = _random_crop(x, self.augment.crop_padding, draws.oy, draws.ox)
        if draws is not None and draws.flip is not None:
            x = torch.where(draws.flip[:, None, None, None], x.flip(3), x)
        x = x * self._scale + self._shift
        if draws is not None and draws.cy is not None:
            # After normalisation, so the square is the mean colour (0), as in the paper.
            x = _cutout(x, self.augment.cutout, draws.cy, draws.cx)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
