"""A batch loader that keeps the split on the training device, or streams it there when it is too large.

The tutorials' way (a Dataset, PIL transforms per image, a DataLoader with worker
processes) spends most of its time in Python, one image at a time. Here, as in
airbench, the split lives on the device as a single uint8 tensor and every step
augments a whole batch with a handful of tensor operations: random crop with zero
padding or random-resized crop (for large images), horizontal flip (random, or
alternating by epoch), optional cutout, then normalisation.

A split larger than ``max_resident_bytes`` (CIFAR-10 at 224 px is 6.8 GB) stays where
:func:`resnet.data.store.load_split` mapped it, on disk: each batch's images are
gathered from the file in a background thread one batch ahead, copied to the device
(from pinned memory, without blocking, on a GPU) and augmented there exactly as a
resident split would be, so both give the same batches bit for bit.

Randomness comes from a CPU generator seeded from ``(seed, epoch)``, so an epoch's
order and augmentations are the same whatever the device and whether or not the run
was resumed in between. With several processes (resnet.distributed) each one takes its
slice of every global batch, and the slices put together are one process's batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from resnet.config import AugmentParams
from resnet.data.store import release_pages

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
    box: Tensor | None = None  # random-resized crop: (N, 4) box width, height, centre x, y (fractions of the image)

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
        if augment.resized_crop_scale > 0:  # drawn last: runs without it draw what they always drew
            d.box = _draw_boxes(n, augment.resized_crop_scale, gen)
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


def _draw_boxes(n: int, min_scale: float, gen: torch.Generator) -> Tensor:
    """Random-resized-crop boxes (Szegedy et al. 2015, torchvision's RandomResizedCrop), drawn for a whole batch.

    Area a share of the image uniform in [min_scale, 1], aspect ratio log-uniform in
    [3/4, 4/3], position uniform where the box fits. Where a side would pass the image's,
    it is cut to fit (torchvision redraws up to ten times, then falls back to the centre).
    """
    area = min_scale + (1 - min_scale) * torch.rand(n, generator=gen, dtype=torch.float64)
    log_ratio = math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=gen, dtype=torch.float64)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(n, generator=gen, dtype=torch.float64)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.stack([w, h, cx, cy], dim=1).float()


def _resized_crop(x: Tensor, box: Tensor) -> Tensor:
    """Each image's box, resized (bilinear) back to the image's size: one grid_sample for the batch."""
    w, h, cx, cy = box.unbind(1)
    zero = torch.zeros_like(w)
    # affine_grid maps output coordinates in [-1, 1] to input ones: x_in = w * x_out + (2 cx - 1).
    theta = torch.stack([torch.stack([w, zero, 2 * cx - 1], 1), torch.stack([zero, h, 2 * cy - 1], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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


def _resident(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """The whole split as one uint8 NCHW tensor on ``device``, copied a chunk at a time from a mapped file."""
    if isinstance(images, Tensor):
        return images.permute(0, 3, 1, 2).contiguous().to(device)
    n, h, w, c = images.shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8, device=device)
    step = max(1, (64 << 20) // max(1, h * w * c))
    for lo in range(0, n, step):
        out[lo : lo + step] = _to_device(torch.from_numpy(np.array(images[lo : lo + step])), device)
        release_pages(images)
    return out


def _to_device(rows: Tensor, device: torch.device) -> Tensor:
    """uint8 (N, H, W, C) rows -> (N, C, H, W) contiguous on ``device`` (the copy overlaps compute on a GPU)."""
    return rows.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()


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
        max_resident_bytes: a numpy split larger than this is not copied to the device
            whole but streamed from where it lies (a file mapped by load_split), batch by
            batch; None = always copy.
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
        max_resident_bytes: int | None = None,
    ) -> None:
        if images.dtype not in (np.uint8, torch.uint8) or images.ndim != 4:
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
        self.streamed = isinstance(images, np.ndarray) and max_resident_bytes is not None
        self.streamed = self.streamed and images.nbytes > max_resident_bytes
        # Resident: NCHW once, up front, so per-batch work is pure indexing. Streamed: the (N, H, W, C) source.
        self._source = images if self.streamed else None
        self.images = None if self.streamed else _resident(images, self.device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(self.device)
        self._shape = tuple(images.shape[1:3])
        channels = images.shape[3]
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
            slices = [slice(i * self.batch_size, min((i + 1) * self.batch_size, n)) for i in range(len(self))]
            for sl, x in zip(slices, self._gather(slices), strict=True):
                yield self._finish(x.float(), None), self.labels[sl]
            return
        gen = self._generator()
        order = torch.randperm(n, generator=gen)
        on_device = order.to(self.device)  # once per epoch: a copy per batch would wait for the GPU each time
        g, b = min(self.global_batch, n), self.batch_size
        # The global batch's draws come first, then this process's micro-batches, as they always did.
        plan = []
        for step in range(self.steps):
            start = step * g
            batch = order[start : start + g]
            draws = _Draws.draw(len(batch), self._shape, self.augment, gen) if self.augment is not None else None
            if draws is not None and self.augment.flip == "alternate":
                draws.flip = self._alternate_flips(batch)
            for micro in range(self.accumulation):
                lo = (micro * self.world_size + self.rank) * b
                hi = min(lo + b, len(batch))
                part = draws.part(lo, hi, self.device) if draws is not None else None
                plan.append((slice(start + lo, start + hi), part))
        picks = [(order[sl], on_device[sl]) for sl, _ in plan]
        for (sl, part), x in zip(plan, self._gather(picks), strict=True):
            yield self._finish(x.float(), part), self.labels[on_device[sl]]

    def _gather(self, batches: Sequence[slice | tuple[Tensor, Tensor]]) -> Iterable[Tensor]:
        """Each batch's uint8 NCHW images on the device, in order (streamed: read one batch ahead).

        A batch is a slice of the split, or its indices on the CPU and on the device.
        """
        if not self.streamed:
            for pick in batches:
                yield self.images[pick] if isinstance(pick, slice) else self.images.index_select(0, pick[1])
            return
        with ThreadPoolExecutor(1, thread_name_prefix="loader") as reader:
            ahead = reader.submit(self._read, batches[0]) if batches else None
            for i in range(len(batches)):
                rows = ahead.result()
                ahead = reader.submit(self._read, batches[i + 1]) if i + 1 < len(batches) else None
                yield _to_device(rows, self.device)

    def _read(self, pick: slice | tuple[Tensor, Tensor]) -> Tensor:
        """One batch's (N, H, W, C) rows from the streamed source, in memory (pinned for a GPU)."""
        rows = np.array(self._source[pick]) if isinstance(pick, slice) else self._source[pick[0].numpy()]
        # The pages read stay resident until dropped; the kernel's page cache keeps them anyway.
        release_pages(self._source)
        rows = torch.from_numpy(rows)
        return rows.pin_memory() if self.device.type == "cuda" else rows

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
        return self._flip_base[batch] ^ bool(self.epoch % 2)

    def _finish(self, x: Tensor, draws: _Draws | None) -> Tensor:
        """Augment (crop, flip), normalise, cut out and lay out one float batch."""
        if draws is not None and draws.oy is not None:
            x = _random_crop(x, self.augment.crop_padding, draws.oy, draws.ox)
        if draws is not None and draws.box is not None:
            x = _resized_crop(x, draws.box)
        if draws is not None and draws.flip is not None:
            x = torch.where(draws.flip[:, None, None, None], x.flip(3), x)
        x = x * self._scale + self._shift
        if draws is not None and draws.cy is not None:
            # After normalisation, so the square is the mean colour (0), as in the paper.
            x = _cutout(x, self.augment.cutout, draws.cy, draws.cx)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
