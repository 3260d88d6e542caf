"""DeviceLoader: shapes, normalisation, augmentation bounds, determinism, eval order (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resnet.config import AugmentParams
from resnet.data.store import load_meta, load_split, release_pages, save_npz
from resnet.loader import DeviceLoader, _draw_boxes, _resized_crop

NO_AUG = AugmentParams(crop_padding=0, flip=False, cutout=0, resized_crop_scale=0.0)


def images(n: int = 10, h: int = 8, w: int = 8, c: int = 3, low: int = 0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 256, size=(n, h, w, c), dtype=np.uint8)


def collect(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def raw(x: torch.Tensor) -> np.ndarray:
    """Undo mean=0, std=1 normalisation: back to 0..255 values, (N, H, W, C)."""
    return (x * 255).round().permute(0, 2, 3, 1).numpy()


def test_eval_batches_shapes_dtypes_and_normalisation():
    x = images(10)
    y = np.arange(10) % 3
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    loader = DeviceLoader(x, y, 4, mean=mean, std=std, device="cpu")
    batches = list(loader)
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]  # the last partial batch kept
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 8, 8) and xb.device.type == "cpu"
        assert yb.dtype == torch.int64
    got, labels = collect(loader)
    expect = (
        torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == y.tolist()  # fixed order


def test_eval_order_is_fixed_and_ignores_augment_and_epoch():
    x, y = images(7), np.arange(7)
    loader = DeviceLoader(
        x,
        y,
        3,
        mean=[0] * 3,
        std=[1] * 3,
        augment=AugmentParams(crop_padding=4, flip=True, cutout=4, resized_crop_scale=0.0),
    )
    first = collect(loader)
    loader.set_epoch(5)
    second = collect(loader)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    np.testing.assert_array_equal(raw(first[0]), x)  # eval never augments


def test_train_shuffles_every_image_once_and_is_seeded():
    n, b = 50, 8
    x, y = images(n), np.arange(n)

    def make(seed: int) -> DeviceLoader:
        return DeviceLoader(x, y, b, mean=[0] * 3, std=[1] * 3, train=True, augment=NO_AUG, seed=seed)

    loader = make(0)
    assert len(loader) == n // b
    _, labels = collect(loader)
    assert len(labels) == (n // b) * b and len(set(labels.tolist())) == len(labels)  # no repeats
    assert labels.tolist() != sorted(labels.tolist())  # shuffled
    loader.set_epoch(1)
    _, labels_e1 = collect(loader)
    assert labels_e1.tolist() != labels.tolist()  # a new order each epoch
    _, again = collect(make(0))
    assert again.tolist() == labels.tolist()  # same seed, same epoch: same order
    _, other = collect(make(1))
    assert other.tolist() != labels.tolist()


def test_augmented_batches_are_reproducible_for_a_resumed_run():
    x, y = images(40), np.arange(40)
    aug = AugmentParams(crop_padding=4, flip=True, cutout=3, resized_crop_scale=0.0)
    a = DeviceLoader(x, y, 16, mean=[0.5] * 3, std=[0.25] * 3, train=True, augment=aug, seed=7)
    epochs = []
    for e in range(3):
        a.set_epoch(e)
        epochs.append(collect(a))
    b = DeviceLoader(x, y, 16, mean=[0.5] * 3, std=[0.25] * 3, train=True, augment=aug, seed=7)
    b.set_epoch(2)  # a resumed run jumps straight to epoch 2
    xb, yb = collect(b)
    assert torch.equal(xb, epochs[2][0]) and torch.equal(yb, epochs[2][1])
    assert not torch.equal(epochs[1][0], epochs[2][0])


def test_crop_stays_within_the_zero_padded_image():
    pad = 4
    x, y = images(64, low=1), np.arange(64)  # no zero pixels: padding is recognisable
    loader = DeviceLoader(
        x,
        y,
        64,
        mean=[0] * 3,
        std=[1] * 3,
        train=True,
        augment=AugmentParams(crop_padding=pad, flip=False, cutout=0, resized_crop_scale=0.0),
        seed=1,
    )
    xb, yb = next(iter(loader))
    out = raw(xb)
    offsets = set()
    for img, label in zip(out, yb.tolist()):
        padded = np.pad(x[label], ((pad, pad), (pad, pad), (0, 0)))
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(padded[dy : dy + 8, dx : dx + 8], img)
        ]
        assert matches, "a crop that is no window of the padded image"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets vary per image


def test_flip_is_a_horizontal_mirror():
    x, y = images(64), np.arange(64)
    loader = DeviceLoader(
        x,
        y,
        64,
        mean=[0] * 3,
        std=[1] * 3,
        train=True,
        augment=AugmentParams(crop_padding=0, flip=True, cutout=0, resized_crop_scale=0.0),
        seed=2,
    )
    xb, yb = next(iter(loader))
    flipped = 0
    for img, label in zip(raw(xb), yb.tolist()):
        if np.array_equal(img, x[label][:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(img, x[label])
    assert 10 < flipped < 54  # about half


def test_cutout_zeroes_one_square_per_image():
    size = 4
    x, y = images(64, low=1), np.arange(64)
    loader = DeviceLoader(
        x,
        y,
        64,
        mean=[0] * 3,
        std=[1] * 3,
        train=True,
        augment=AugmentParams(crop_padding=0, flip=False, cutout=size, resized_crop_scale=0.0),
        seed=3,
    )
    xb, yb = next(iter(loader))
    full_squares = 0
    for img, label in zip(raw(xb), yb.tolist()):
        zero = (img == 0).all(axis=2)
        assert ((img == 0) == zero[..., None]).all()  # every channel or none
        np.testing.assert_array_equal(img[~zero], x[label][~zero])  # untouched elsewhere
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        assert len(rows) >= 1
        assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one solid rectangle
        assert len(rows) <= size and len(cols) <= size  # clipped at the border, never larger
        full_squares += len(rows) == size and len(cols) == size
    assert full_squares > 0


def test_labels_follow_their_images_through_shuffle_and_augmentation():
    n = 30
    y = np.arange(n) % 10
    x = np.repeat((y * 20 + 10).astype(np.uint8)[:, None, None, None], 8, axis=1).repeat(8, 2).repeat(3, 3)
    loader = DeviceLoader(
        x,
        y,
        8,
        mean=[0] * 3,
        std=[1] * 3,
        train=True,
        augment=AugmentParams(crop_padding=2, flip=True, cutout=0, resized_crop_scale=0.0),
        seed=4,
    )
    for xb, yb in loader:
        centre = raw(xb)[:, 4, 4, 0]
        np.testing.assert_array_equal(centre, yb.numpy() * 20 + 10)


def test_channels_last_and_grayscale():
    x = images(6, c=1)
    loader = DeviceLoader(x, np.zeros(6), 4, mean=[0.5], std=[0.5], channels_last=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 8, 8) and yb.dtype == torch.int64
    x3 = images(6)
    xb3, _ = next(iter(DeviceLoader(x3, np.zeros(6), 4, mean=[0.5] * 3, std=[0.5] * 3, channels_last=True)))
    assert xb3.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images(4).astype(np.float32), np.zeros(4), 2, mean=[0] * 3, std=[1] * 3)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(images(4), np.zeros(3), 2, mean=[0] * 3, std=[1] * 3)
    with pytest.raises(ValueError, match="mean/std"):
        DeviceLoader(images(4), np.zeros(4), 2, mean=[0], std=[1])


def test_loader_reads_what_the_split_stage_writes(tiny_prepared):
    meta = load_meta(tiny_prepared)
    x, y = load_split(tiny_prepared, "val")
    loader = DeviceLoader(x, y, 4, mean=meta["mean"], std=meta["std"])
    xb, yb = collect(loader)
    assert xb.shape == (len(y), meta["channels"], *meta["image_size"]) and yb.tolist() == y.tolist()
    tx, ty = load_split(tiny_prepared, "train")
    train_x, _ = collect(DeviceLoader(tx, ty, len(ty), mean=meta["mean"], std=meta["std"]))
    # Normalised with the train split's own statistics: mean 0, std 1 per channel.
    torch.testing.assert_close(train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(train_x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- splits larger than the budget


def _mapped_split(tmp_path, n: int = 300, size: int = 12, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A split file as the split stage writes it, read back memory-mapped."""
    (tmp_path / "prep").mkdir(exist_ok=True)
    save_npz(tmp_path / "prep" / "train.npz", images=images(n, size, size, seed=seed), labels=np.arange(n) % 10)
    return load_split(tmp_path / "prep", "train")


@pytest.mark.parametrize(
    "augment,world_size,accumulation",
    [
        (AugmentParams(crop_padding=3, flip=True, cutout=4, resized_crop_scale=0.0), 1, 1),
        (AugmentParams(crop_padding=0, flip="alternate", cutout=0, resized_crop_scale=0.3), 2, 2),
    ],
)
def test_a_streamed_split_gives_the_resident_batches_bit_for_bit(tmp_path, augment, world_size, accumulation):
    x, y = _mapped_split(tmp_path)
    assert not x.flags.writeable  # mapped read-only, not loaded
    kw = {"mean": [0.4] * 3, "std": [0.2] * 3, "seed": 5, "channels_last": True}
    for rank in range(world_size):
        share = {"rank": rank, "world_size": world_size, "accumulation": accumulation}
        resident = DeviceLoader(x, y, 16, train=True, augment=augment, **kw, **share)
        streamed = DeviceLoader(x, y, 16, train=True, augment=augment, max_resident_bytes=x.nbytes - 1, **kw, **share)
        assert streamed.streamed and not resident.streamed and len(streamed) == len(resident)
        for epoch in (0, 3):  # a resumed run starts at a later epoch: same batches either way
            resident.set_epoch(epoch)
            streamed.set_epoch(epoch)
            for (xa, ya), (xb, yb) in zip(resident, streamed, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.stride() == xb.stride()
    plain = dict(kw, channels_last=False)
    evals = [DeviceLoader(x, y, 64, **plain, max_resident_bytes=m) for m in (None, 0)]
    for (xa, ya), (xb, yb) in zip(*evals, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.is_contiguous()


def _rss_file_kb() -> int:
    """This process's resident pages backed by files (mapped splits count here)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_streaming_a_split_does_not_keep_it_resident(tmp_path):
    """Pages of a mapped split count as resident until dropped: the loader drops them batch by batch."""
    x, y = _mapped_split(tmp_path, n=1200, size=96)  # 33 MB
    loader = DeviceLoader(x, y, 50, mean=[0.5] * 3, std=[0.25] * 3, train=True, augment=NO_AUG, max_resident_bytes=0)
    for _ in DeviceLoader(x[:100].copy(), y[:100], 50, mean=[0.5] * 3, std=[0.25] * 3, train=True, augment=NO_AUG):
        pass  # torch's code for these steps paged in first: its pages count as file-backed too
    before = _rss_file_kb()
    peak = 0
    for _ in loader:
        peak = max(peak, _rss_file_kb() - before)
    assert peak < 8 * 1024, f"{peak} kB of the 33 MB split stayed resident"
    assert np.array(x).sum() > 0 and _rss_file_kb() - before > 24 * 1024  # reading without dropping does count
    release_pages(x)
    assert _rss_file_kb() - before < 4 * 1024


def test_resized_crop_boxes_fit_the_image_and_follow_the_scale():
    gen = torch.Generator().manual_seed(0)
    box = _draw_boxes(20000, 0.25, gen).double()
    w, h, cx, cy = box.unbind(1)
    assert (w <= 1).all() and (h <= 1).all() and (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    area = w * h  # drawn uniform in [0.25, 1]; only boxes of area above 3/4 can need cutting to fit
    assert area.min() >= 0.25 - 1e-6 and area.max() <= 1 + 1e-6
    small = area < 0.75
    assert abs(small.double().mean().item() - 2 / 3) < 0.02 and abs(area[small].mean().item() - 0.5) < 0.01
    ratio = (w / h)[small]
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6 and abs(ratio.log().mean().item()) < 0.01


def test_resized_crop_takes_the_box_and_resizes_it():
    x = torch.from_numpy(images(2, 16, 16)).permute(0, 3, 1, 2).float()
    whole = torch.tensor([[1.0, 1.0, 0.5, 0.5]] * 2)
    torch.testing.assert_close(_resized_crop(x, whole), x, atol=1e-3, rtol=0)  # the whole image: itself
    quarter = torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]])
    got = _resized_crop(x, quarter)
    want = torch.stack([x[0, :, :8, :8], x[1, :, 8:, 8:]])
    want = torch.nn.functional.interpolate(want, size=(16, 16), mode="bilinear", align_corners=False)
    # Inside the box both interpolate the same pixels; at its edge grid_sample sees the neighbours beyond it.
    torch.testing.assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-3, rtol=0)
    assert got.shape == x.shape
