"""The data stages: download (sources, checksums, safety, failures) and split (decoding, splits, files).

Every archive here is built by tests/archives.py in a temporary folder; nothing is
downloaded. Network tests talk only to 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from archives import (
    CLASSES,
    jpeg_claiming_size,
    make_cifar_archive,
    make_malicious_tar,
    make_malicious_zip,
    make_tar,
    make_zip,
    md5_of,
    png_bomb,
    sha256_of,
    write_imagefolder,
)
from paramsets import PARAMS_FILE, data_params, repo_params
from PIL import Image

from resnet import preprocess
from resnet.config import ConfigError, DataParams, parse_params
from resnet.data import archives, tar_reader
from resnet.data import decode as decode_module
from resnet.data import split as split_module
from resnet.data.archives import iter_archive
from resnet.data.datasets import OFFICIAL_ARCHIVES, imagefolder_layout, read_imagefolder
from resnet.data.errors import DataError
from resnet.data.sources import download
from resnet.data.split import prepare, stratified_split
from resnet.data.store import SplitWriter, load_meta, load_split, save_npz

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def folder_params(source: Path | str, **kw) -> DataParams:
    return data_params(dataset="imagefolder", source=str(source), **kw)


def run_stages(source: Path | str, tmp: Path, **kw) -> tuple[dict, Path]:
    """download + prepare into tmp/raw and tmp/prepared; returns (meta, prepared dir)."""
    params = folder_params(source, **kw)
    download(params, tmp / "raw")
    meta = prepare(tmp / "raw", tmp / "prepared", params)
    return meta, tmp / "prepared"


def raw_params(**data) -> dict:
    """The repository's params.yaml as parsed YAML, data keys changed without validation (to test it)."""
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["data"].update(data)
    return raw


def write_raw_params(path: Path, **data) -> None:
    path.write_text(yaml.safe_dump(raw_params(**data), sort_keys=False))


def leftovers(parent: Path) -> list[str]:
    """What a failed stage left in the output's parent folder (temp folders included)."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# --------------------------------------------------------------------------- params validation


@pytest.mark.parametrize(
    "data, key",
    [
        ({"datset": "cifar10"}, "datset"),
        ({"seed": "zero"}, "data.seed"),
        ({"val_fraction": "a lot"}, "data.val_fraction"),
        ({"max_per_class": 2.5}, "data.max_per_class"),
        ({"channels": 2}, "data.channels"),
        ({"dataset": "mnist"}, "data.dataset"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"test_fraction": -0.1}, "data.test_fraction"),
        ({"sha256": "abc"}, "data.sha256"),
    ],
)
def test_bad_data_params_raise_config_error_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params(raw_params(**data))


def stage(script: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESNET_NO_PROGRESS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", ["download.py", "split.py"])
def test_stage_exits_nonzero_before_any_work_on_bad_params(tmp_path, script):
    write_raw_params(tmp_path / "params.yaml", dataset="imagefolder", val_fraction=2, source="x.tar")
    r = stage(script, tmp_path)
    assert r.returncode == 1
    assert "data.val_fraction" in r.stderr and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [r.stderr.strip()]  # one line
    assert leftovers(tmp_path) == ["params.yaml"]  # no data/ at all


# --------------------------------------------------------------------------- CIFAR python archives


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_archive_is_read_with_its_real_keys(tmp_path, dataset):
    arc = tmp_path / f"{dataset}-python.tar.gz"
    truth = make_cifar_archive(arc, dataset)
    params = data_params(dataset=dataset, source=str(arc), sha256=sha256_of(arc), val_fraction=0.2)
    record = download(params, tmp_path / "raw")
    assert record["sha256"] == sha256_of(arc) and record["size"] == arc.stat().st_size
    assert record["dataset"] == dataset and record["source"] == str(arc) and record["date"]
    assert json.loads((tmp_path / "raw" / "source.json").read_text()) == record
    assert (tmp_path / "raw" / record["path"]).read_bytes() == arc.read_bytes()

    meta = prepare(tmp_path / "raw", tmp_path / "prepared", params)
    assert meta["classes"] == truth["classes"] and meta["num_classes"] == len(truth["classes"])
    assert meta["image_size"] == [32, 32] and meta["channels"] == 3
    x_test, y_test = load_split(tmp_path / "prepared", "test")
    np.testing.assert_array_equal(x_test, truth["test_x"])  # the official test split, untouched
    np.testing.assert_array_equal(y_test, truth["test_y"])
    x_tr, y_tr = load_split(tmp_path / "prepared", "train")
    x_val, y_val = load_split(tmp_path / "prepared", "val")
    # train + val is exactly the training pool, every image once
    pool = {img.tobytes(): int(lbl) for img, lbl in zip(truth["train_x"], truth["train_y"], strict=True)}
    pool_x, pool_y = np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val])
    got = [(img.tobytes(), int(lbl)) for img, lbl in zip(pool_x, pool_y, strict=True)]
    assert sorted(got) == sorted(pool.items())
    assert meta["source_sha256"] == sha256_of(arc)


def test_cifar_archive_must_match_the_official_md5(tmp_path, monkeypatch):
    arc = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(arc)
    with pytest.raises(DataError, match=r"checksum mismatch.*md5.*c58f30108f718f92721af3b95e74349a.*data\.sha256"):
        download(data_params(dataset="cifar10", source=str(arc)), tmp_path / "raw")
    assert leftovers(tmp_path) == [arc.name]
    # The same archive passes when it is the one the official checksum names.
    official = dataclasses.replace(OFFICIAL_ARCHIVES["cifar10"], md5=md5_of(arc))
    monkeypatch.setitem(OFFICIAL_ARCHIVES, "cifar10", official)
    rec = download(data_params(dataset="cifar10", source=arc.as_uri()), tmp_path / "raw")  # file:// URL
    assert rec["md5"] == md5_of(arc)


def test_cifar_batches_cannot_run_code(tmp_path):
    """A pickle that calls os.system is refused by the restricted unpickler, not executed."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    arc = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(arc)
    # Swap test_batch for the evil pickle.
    with tarfile.open(arc) as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]
    import pickle

    with tarfile.open(arc, "w:gz") as tf:
        for m, payload in members:
            if m.name.endswith("test_batch"):
                payload = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
                m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload) if payload is not None else None)
    params = data_params(dataset="cifar10", source=str(arc), sha256=sha256_of(arc))
    download(params, tmp_path / "raw")
    with pytest.raises(DataError, match="not allowed"):
        prepare(tmp_path / "raw", tmp_path / "prepared", params)
    assert not marker.exists() and not (tmp_path / "prepared").exists()


def test_cifar_dataset_refuses_an_image_folder_archive(tmp_path, tiny_imagefolder_tgz):
    with pytest.raises(DataError, match="not a CIFAR python archive.*data.dataset=imagefolder"):
        download(
            data_params(dataset="cifar10", source=str(tiny_imagefolder_tgz), sha256=sha256_of(tiny_imagefolder_tgz)),
            tmp_path / "raw",
        )


# --------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def folder_sources(tmp_path_factory):
    """The same tiny image folder as a directory, tar (plain, gz, bz2, xz, ustar/gnu/pax) and zip."""
    root = tmp_path_factory.mktemp("sources")
    truth = write_imagefolder(root / "plain")
    write_imagefolder(root / "wrapped", wrapper="tiny")
    sources = {
        "dir": root / "plain",
        "dir-wrapped": root / "wrapped" / "tiny",
        "tar": make_tar(root / "plain", root / "a.tar", compression=""),
        "tar.gz-wrapped": make_tar(root / "wrapped", root / "b.tar.gz"),
        "tar.bz2-gnu": make_tar(root / "plain", root / "c.tar.bz2", compression="bz2", fmt=tarfile.GNU_FORMAT),
        "tar.xz-ustar": make_tar(root / "wrapped", root / "d.tar.xz", compression="xz", fmt=tarfile.USTAR_FORMAT),
        "zip": make_zip(root / "plain", root / "e.zip"),
        "zip-wrapped": make_zip(root / "wrapped", root / "f.zip"),
    }
    return truth, sources


@pytest.mark.parametrize(
    "kind", ["dir", "dir-wrapped", "tar", "tar.gz-wrapped", "tar.bz2-gnu", "tar.xz-ustar", "zip", "zip-wrapped"]
)
def test_every_source_kind_gives_the_same_prepared_files(tmp_path, folder_sources, kind):
    truth, sources = folder_sources
    meta, out = run_stages(sources[kind], tmp_path, val_fraction=0.2)
    assert meta["classes"] == sorted(CLASSES)
    assert meta["sizes"] == {"train": 24, "val": 6, "test": 12}
    assert meta["counts"]["val"] == {c: 2 for c in CLASSES} and meta["counts"]["test"] == {c: 4 for c in CLASSES}
    x_test, y_test = load_split(out, "test")
    np.testing.assert_array_equal(x_test, truth["test"][0])  # PNG: exact pixels, sorted order
    np.testing.assert_array_equal(y_test, truth["test"][1])
    # Byte-identical to the plain directory's output: the source's form does not matter.
    ref = tmp_path / "ref"
    run_stages(sources["dir"], ref, val_fraction=0.2)
    for split in ("train", "val", "test"):
        assert (out / f"{split}.npz").read_bytes() == (ref / "prepared" / f"{split}.npz").read_bytes()


def both_tar_readers(path: Path, read_data: bool = True) -> dict[str, list]:
    """What the hand-written reader and tarfile's streaming mode make of a tar archive."""
    fmt = archives._archive_format(path)
    return {
        "hand-written": list(archives._iter_tar(path, fmt, read_data)),
        "tarfile": list(archives._iter_tarfile(path, read_data)),
    }


def test_both_tar_readers_agree_on_long_names_links_and_folders_in_every_format(tmp_path):
    """Long names (GNU 'L' records, pax 'path', ustar prefix), links and folders, in every tar format."""
    src = tmp_path / "src"
    long_dir = src / "train" / ("c" * 60) / ("d" * 70)
    long_dir.mkdir(parents=True)
    (long_dir / ("e" * 90 + ".png")).write_bytes(b"x" * 700)
    (src / "train" / "cat").mkdir()
    (src / "train" / "cat" / "a.png").write_bytes(b"y" * 512)
    (src / "train" / "cat" / "empty.png").write_bytes(b"")
    os.symlink("a.png", src / "train" / "cat" / "link.png")
    expected = sorted(
        [
            (f"train/{'c' * 60}/{'d' * 70}/{'e' * 90}.png", "file", b"x" * 700, None),
            ("train/cat/a.png", "file", b"y" * 512, None),
            ("train/cat/empty.png", "file", b"", None),
            ("train/cat/link.png", "link", None, "train/cat/a.png"),
        ]
    )
    folders = sorted(["train/", f"train/{'c' * 60}/", f"train/{'c' * 60}/{'d' * 70}/", "train/cat/"])
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        arc = make_tar(src, tmp_path / f"t{fmt}.tar.gz", fmt=fmt)
        for reader, entries in both_tar_readers(arc).items():
            assert sorted((e.name, e.kind, e.data, e.target) for e in entries) == expected, reader
        fmt_name = archives._archive_format(arc)
        for entries in (archives._iter_tar(arc, fmt_name, False, folders=True), iter_archive(arc, folders=True)):
            assert sorted(e.name for e in entries if e.kind == "dir") == folders


def test_git_archive_style_global_header_stays_on_the_hand_written_reader(tmp_path, monkeypatch):
    """git archive (and the shared CIFAR-10 JPEG copy) starts with a global pax 'comment' record."""
    truth = write_imagefolder(tmp_path / "src", per_class={"train": 2})
    arc = tmp_path / "git.tar.gz"
    with tarfile.open(arc, "w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "d7d0561806"}) as tf:
        for p in sorted((tmp_path / "src").rglob("*")):
            tf.add(p, arcname=p.relative_to(tmp_path / "src").as_posix(), recursive=False)
    expected = [(e.name, e.data) for e in archives._iter_tarfile(arc, True)]
    monkeypatch.setattr(archives, "_iter_tarfile", lambda *a: pytest.fail("fell back to tarfile"))
    assert [(e.name, e.data) for e in iter_archive(arc)] == expected and len(expected) == len(truth["train"][1])


def test_fallback_to_tarfile_hands_out_each_member_once(monkeypatch, tiny_imagefolder_tgz):
    expected = [(e.name, e.data) for e in archives._iter_tarfile(tiny_imagefolder_tgz, True)]
    real = archives._iter_tar

    def gives_up_midway(path, fmt, read_data, **kw):
        for i, entry in enumerate(real(path, fmt, read_data, **kw)):
            if i == 5:
                raise tar_reader.Unsupported("test")
            yield entry

    monkeypatch.setattr(archives, "_iter_tar", gives_up_midway)
    assert [(e.name, e.data) for e in iter_archive(tiny_imagefolder_tgz)] == expected
    with_folders = [(e.name, e.kind) for e in archives._iter_tarfile(tiny_imagefolder_tgz, False, folders=True)]
    assert [(e.name, e.kind) for e in iter_archive(tiny_imagefolder_tgz, folders=True)] == with_folders
    assert ("tiny/train/cat/", "dir") in with_folders


def _tar_with_bad_third_member(tmp_path: Path, damage: str) -> Path:
    """A plain tar of 6 images, cut just before its third member's header or with that header damaged."""
    write_imagefolder(tmp_path / "src", per_class={"train": 2})
    arc = make_tar(tmp_path / "src", tmp_path / "full.tar", compression="")
    with tarfile.open(arc) as tf:
        offset = [m for m in tf.getmembers() if m.isfile()][2].offset
    data = bytearray(arc.read_bytes())
    if damage == "cut":
        data = data[:offset]  # whole members only: tarfile alone would take this for a shorter archive
    else:
        data[offset + 10] ^= 0xFF  # a name byte: the header checksum no longer matches
    out = tmp_path / f"{damage}.tar"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    "damage, message", [("cut", "truncated: no end-of-archive marker"), ("header", "corrupt: bad tar header")]
)
def test_tar_without_end_marker_or_with_a_bad_header_is_refused(tmp_path, damage, message):
    arc = _tar_with_bad_third_member(tmp_path, damage)
    for read in (lambda: archives._iter_tar(arc, "tar", False), lambda: archives._iter_tarfile(arc, False)):
        with pytest.raises(DataError, match=message):
            list(read())
    with pytest.raises(DataError, match=message):
        download(folder_params(arc), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        download(folder_params(tmp_path / "empty.tar.gz"), tmp_path / "raw")
    with pytest.raises(DataError, match="is empty"):
        list(archives._iter_tarfile(tmp_path / "empty.tar.gz", True))


def test_jpeg_fast_path_matches_pil(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 5}, fmt="jpg", size=16)
    meta, out = run_stages(tmp_path / "src", tmp_path, val_fraction=0.2)
    x, y = load_split(out, "test")  # carved from train: no test/ folder
    names = sorted((tmp_path / "raw" / "src" / "train").rglob("*.jpg"))
    pil = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in names}
    assert {img.tobytes() for img in x} <= pil and x.shape[1:] == (16, 16, 3)


def test_missing_test_split_is_carved_from_train_stratified(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 20})
    meta, out = run_stages(tmp_path / "src", tmp_path, test_fraction=0.25, val_fraction=0.2)
    assert meta["counts"]["test"] == {c: 5 for c in CLASSES}
    assert meta["counts"]["val"] == {c: 3 for c in CLASSES}
    assert meta["counts"]["train"] == {c: 12 for c in CLASSES}
    assert "carved" in meta["test_split"]
    seen = [img.tobytes() for s in ("train", "val", "test") for img in load_split(out, s)[0]]
    assert len(seen) == len(set(seen)) == 60  # disjoint, nothing lost


def test_split_is_seeded_and_byte_identical(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 30, "test": 3})
    _, a = run_stages(tmp_path / "src", tmp_path / "a", seed=3)
    _, b = run_stages(tmp_path / "src", tmp_path / "b", seed=3)
    _, c = run_stages(tmp_path / "src", tmp_path / "c", seed=4)
    for name in ("train.npz", "val.npz", "test.npz", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "val.npz").read_bytes() != (c / "val.npz").read_bytes()
    assert (a / "test.npz").read_bytes() == (c / "test.npz").read_bytes()  # the official test split
    # The content digest names the data: the same for the same splits, another for another split or cap.
    _, d = run_stages(tmp_path / "src", tmp_path / "d", seed=3, max_per_class=20)
    digests = [json.loads((x / "meta.json").read_text())["content_sha256"] for x in (a, b, c, d)]
    assert digests[0] == digests[1] and len(set(digests)) == 3


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 10, 1])
    keep, take = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[take], minlength=4).tolist() == [10, 5, 1, 0]
    assert np.bincount(labels[keep], minlength=4).tolist() == [90, 45, 9, 1]
    assert len(np.intersect1d(keep, take)) == 0 and len(keep) + len(take) == len(labels)
    assert (np.diff(keep) > 0).all() and (np.diff(take) > 0).all()
    keep2, take2 = stratified_split(labels, 0.1, seed=1)
    assert not np.array_equal(take, take2)


def test_mean_std_come_from_train_split_only(tmp_path):
    meta, out = run_stages(*_small_folder(tmp_path))
    x, _ = load_split(out, "train")
    flat = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(meta["mean"], flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(meta["std"], flat.std(0), rtol=1e-12)
    allx = np.concatenate([load_split(out, s)[0] for s in ("train", "val", "test")]).reshape(-1, 3) / 255
    assert not np.allclose(meta["mean"], allx.mean(0), rtol=1e-9)


def _small_folder(tmp_path: Path) -> tuple[Path, Path]:
    write_imagefolder(tmp_path / "src", per_class={"train": 10, "test": 4})
    return tmp_path / "src", tmp_path


def test_max_per_class_caps_train_pool_and_test_proportionally(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 40, "test": 8})
    meta, _ = run_stages(tmp_path / "src", tmp_path, max_per_class=10, val_fraction=0.2)
    assert meta["counts"]["train"] == {c: 8 for c in CLASSES}
    assert meta["counts"]["val"] == {c: 2 for c in CLASSES}
    assert meta["counts"]["test"] == {c: 2 for c in CLASSES}  # 8 * 10/40
    assert meta["max_per_class"] == 10


def test_too_few_images_for_a_validation_split_is_an_error(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 1, "test": 1})
    with pytest.raises(DataError, match="val split.*would be empty"):
        run_stages(tmp_path / "src", tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_grayscale_and_resize(tmp_path):
    truth = write_imagefolder(tmp_path / "src", per_class={"train": 5, "test": 2}, size=12)
    meta, out = run_stages(tmp_path / "src", tmp_path, channels=1, image_size=8)
    x, _ = load_split(out, "test")
    assert x.shape == (6, 8, 8, 1) and meta["channels"] == 1 and meta["image_size"] == [8, 8]
    assert len(meta["mean"]) == len(meta["std"]) == 1
    expect = np.asarray(Image.fromarray(truth["test"][0][0]).resize((8, 8), Image.Resampling.BILINEAR).convert("L"))
    np.testing.assert_array_equal(x[0, :, :, 0], expect)  # PIL's luma, after resizing


def test_gray_conversion_matches_pil():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    ours = preprocess.to_grayscale(rgb)[..., 0]
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    np.testing.assert_array_equal(ours, pil)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("channels", [3, 1])
def test_preprocess_is_rgb_then_resize_then_grayscale_from_bytes_or_arrays(channels):
    """The split stage's order, whatever the entry point: an encoded file, one array, or a batch of any sizes."""
    rng = np.random.default_rng(1)
    rgb, gray = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8), rng.integers(0, 256, (9, 14), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for image in (rgb, gray):
        pil = Image.fromarray(image).convert("RGB").resize((8, 6), Image.Resampling.BILINEAR).convert(mode)
        expected = np.asarray(pil).reshape(6, 8, channels)
        for got in (
            preprocess.from_bytes(_png(image), (6, 8), channels),
            preprocess.model_pixels(image, (6, 8), channels),
            preprocess.model_pixels(image[..., None] if image.ndim == 2 else image, (6, 8), channels),
        ):
            np.testing.assert_array_equal(got, expected)
    batch = preprocess.batch_pixels([rgb, gray, gray[..., None]], (6, 8), channels)
    assert batch.shape == (3, 6, 8, channels)
    np.testing.assert_array_equal(batch[1], batch[2])
    np.testing.assert_array_equal(batch[0], preprocess.model_pixels(rgb, (6, 8), channels))
    # Arrays already at the size are converted whole: the same pixels as one by one.
    same = rng.integers(0, 256, (5, 6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        preprocess.batch_pixels(same, (6, 8), channels),
        np.stack([preprocess.model_pixels(im, (6, 8), channels) for im in same]),
    )


def test_preprocess_refuses_what_is_not_a_1_or_3_channel_uint8_image():
    with pytest.raises(ValueError, match=r"C = 1 \(grayscale\) or 3 \(RGB\).*\(2, 5, 5, 4\)"):
        preprocess.batch_pixels(np.zeros((2, 5, 5, 4), np.uint8), 5, 3)
    with pytest.raises(ValueError, match="uint8.*float32"):
        preprocess.model_pixels(np.zeros((5, 5, 3), np.float32), 5, 3)
    with pytest.raises(ValueError, match="differ in size"):
        preprocess.batch_pixels([np.zeros((5, 5, 3), np.uint8), np.zeros((6, 5, 3), np.uint8)], None, 3)
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess.decode(b"\x89PNG not really")


def test_cifar_resize_and_grayscale_follow_preprocess(tmp_path):
    arc = tmp_path / "cifar-10-python.tar.gz"
    truth = make_cifar_archive(arc)
    params = data_params(dataset="cifar10", source=str(arc), sha256=sha256_of(arc), image_size=16, channels=1)
    download(params, tmp_path / "raw")
    meta = prepare(tmp_path / "raw", tmp_path / "prepared", params)
    x_test, _ = load_split(tmp_path / "prepared", "test")
    assert meta["image_size"] == [16, 16] and meta["channels"] == 1
    np.testing.assert_array_equal(x_test, preprocess.batch_pixels(list(truth["test_x"]), 16, 1))


@pytest.mark.parametrize("chunk_images", [None, 2])
def test_mixed_image_sizes_need_image_size(tmp_path, monkeypatch, chunk_images):
    if chunk_images:  # the odd image in another chunk than the first image's
        monkeypatch.setattr(split_module, "_CHUNK_BYTES", chunk_images * 8 * 8 * 3)
    write_imagefolder(tmp_path / "src", per_class={"train": 3}, size=8)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "src" / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match=r"differ in size \(.*odd\.png is 8x9.*data\.image_size"):
        run_stages(tmp_path / "src", tmp_path)
    assert not (tmp_path / "prepared").exists()
    run_stages(tmp_path / "src", tmp_path / "ok", image_size=8)


def test_splits_are_written_a_chunk_at_a_time_and_read_mapped(tmp_path, monkeypatch):
    """Chunks of 3 images or one chunk: the same files and meta; the splits come back mapped, not loaded."""
    truth = write_imagefolder(tmp_path / "src", per_class={"train": 7, "test": 3}, size=10)
    whole, whole_dir = run_stages(tmp_path / "src", tmp_path / "whole", image_size=12)
    monkeypatch.setattr(split_module, "_CHUNK_BYTES", 3 * 12 * 12 * 3)
    chunked, chunked_dir = run_stages(tmp_path / "src", tmp_path / "chunked", image_size=12)
    assert chunked == whole
    for split in ("train", "val", "test"):
        assert (chunked_dir / f"{split}.npz").read_bytes() == (whole_dir / f"{split}.npz").read_bytes()
        x, y = load_split(chunked_dir, split)
        assert not x.flags.writeable and not x.flags.owndata  # a view of the mapped file
        with np.load(chunked_dir / f"{split}.npz") as z:  # still a plain npz for numpy
            np.testing.assert_array_equal(z["images"], x)
            np.testing.assert_array_equal(z["labels"], y)
    x_test, _ = load_split(chunked_dir, "test")
    np.testing.assert_array_equal(x_test, preprocess.batch_pixels(truth["test"][0], 12, 3))
    # The digest is of the contents, as it always was: names, dtypes, shapes, pixels, labels.
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for arr in load_split(chunked_dir, split):
            h.update(f"{split}:{arr.dtype.str}:{arr.shape}\n".encode())
            h.update(np.ascontiguousarray(arr).data)
    assert whole["content_sha256"] == h.hexdigest()


def test_split_writer_and_load_split_agree_with_numpy(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 5, 6, 3), dtype=np.uint8)
    y = np.arange(50)
    save_npz(tmp_path / "a.npz", images=x, labels=y)
    with SplitWriter(tmp_path / "b.npz", 50, (5, 6, 3)) as w:
        for lo in range(0, 50, 7):
            w.write(x[lo : lo + 7])
        w.finish(y)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with pytest.raises(ValueError, match="does not fit"), SplitWriter(tmp_path / "c.npz", 2, (5, 6, 3)) as w:
        w.write(x[:3])
    # Cut short (a copy interrupted): refused, naming the file and the fix; nothing mapped past its end.
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "train.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:3000])
    with pytest.raises(DataError, match=r"train\.npz is unreadable or incomplete .*dvc repro -f split"):
        load_split(tmp_path / "cut", "train")
    # One pixel changed on disk (bit rot, a stray write): the zip's CRC catches it, as np.load's did.
    (tmp_path / "rot").mkdir()
    data = bytearray((tmp_path / "a.npz").read_bytes())
    at = data.index(x.tobytes()[:64]) + 1000
    data[at] ^= 0x01
    (tmp_path / "rot" / "train.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"images\.npy fails its CRC check.*dvc repro -f split"):
        load_split(tmp_path / "rot", "train")
    (tmp_path / "z").mkdir()
    np.savez_compressed(tmp_path / "z" / "val.npz", images=x, labels=y)  # nothing to map: read whole
    got_x, got_y = load_split(tmp_path / "z", "val")
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_no_train_folder_is_a_clear_error(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"training": 3})
    with pytest.raises(DataError, match="no train/ folder"):
        download(folder_params(make_zip(tmp_path / "src", tmp_path / "x.zip")), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_corrupt_image_names_the_file(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 3})
    (tmp_path / "src" / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="train/dog/bad.png"):
        run_stages(tmp_path / "src", tmp_path)
    assert not (tmp_path / "prepared").exists()


# --------------------------------------------------------------------------- untrusted images


@pytest.mark.parametrize("width, height", [(20_000, 20_000), (10_000, 9_000)])
def test_decompression_bomb_is_refused_from_its_header_naming_size_and_limit(width, height):
    """Past PIL's hard limit (it raised DecompressionBombError) and between its warning and hard limits
    (it only warned, then decoded 270 MB): both refused, with no warning, naming the size and the limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            preprocess.ImageError, match=rf"{width * height:,} pixels\) is over the limit of 89,478,485"
        ):
            preprocess.decode(png_bomb(width, height))


def test_split_refuses_a_decompression_bomb_naming_the_file(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 3})
    (tmp_path / "src" / "train" / "dog" / "bomb.png").write_bytes(png_bomb())
    message = r"train/dog/bomb.png: image \(400,000,000 pixels\) is over the limit of 89,478,485 pixels.*megapixels"
    with pytest.raises(DataError, match=message):
        run_stages(tmp_path / "src", tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_oversized_jpeg_never_reaches_the_fast_decoder(tmp_path, monkeypatch):
    """torchvision decodes JPEGs with no size limit: the header's size is checked first."""
    write_imagefolder(tmp_path / "src", per_class={"train": 3}, fmt="jpg")
    big = jpeg_claiming_size(12_000, 8_000)
    (tmp_path / "src" / "train" / "cat" / "big.jpg").write_bytes(big)
    seen: list[bytes] = []
    fast = decode_module._decode_jpeg_batch
    monkeypatch.setattr(decode_module, "_decode_jpeg_batch", lambda blobs: seen.extend(blobs) or fast(blobs))
    with pytest.raises(DataError, match=r"train/cat/big.jpg: image 12000x8000 \(96,000,000 pixels\) is over the limit"):
        read_imagefolder(tmp_path / "src")  # all ten in one decoding call
    assert big not in seen and len(seen) == 9  # the others went the fast way
    seen.clear()
    with pytest.raises(DataError, match=r"train/cat/big.jpg: image 12000x8000"):
        run_stages(tmp_path / "src", tmp_path)  # the split stage decodes as it writes, a chunk at a time
    assert big not in seen


def test_a_class_folder_without_images_is_named(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 3})
    (tmp_path / "src" / "train" / "bird").mkdir()
    (tmp_path / "src" / "train" / "bird" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "src" / "train" / "bird" / "notes.txt").write_text("to do")
    for source in (tmp_path / "src", make_zip(tmp_path / "src", tmp_path / "x.zip")):
        with pytest.raises(DataError, match=r"class folder\(s\) \['train/bird/'\] hold no images"):
            download(folder_params(source), tmp_path / "raw")
        assert not (tmp_path / "raw").exists()


def test_an_empty_class_folder_entry_is_named():
    """A folder entry (as a tar or zip lists an empty folder: a name ending in '/') counts as a class folder."""
    names = ["data/train/cat/0.png", "data/train/dog/0.png", "data/train/dog/1.png", "data/train/emu/", "data/x/"]
    with pytest.raises(DataError, match=r"\['data/train/emu/'\] hold no images"):
        imagefolder_layout(names, Path("x.tar"))
    prefix, layout = imagefolder_layout([*names[:3], "data/train/", "data/train/cat/", "data/.git/"], Path("x.tar"))
    assert prefix == "data/" and layout == {"train": names[:3]}


@pytest.mark.parametrize("form", ["tar.gz", "zip", "folder"])
def test_an_empty_class_folder_is_named_in_every_source_form(tmp_path, form):
    """An empty folder is only a folder entry in a tar or zip, and nothing at all in a copy of files only."""
    src = tmp_path / "src"
    write_imagefolder(src, per_class={"train": 3})
    (src / "train" / "bird").mkdir()
    if form == "tar.gz":
        source = make_tar(src, tmp_path / "x.tar.gz")
    else:
        source = make_zip(src, tmp_path / "x.zip") if form == "zip" else src
    message = r"class folder\(s\) \['train/bird/'\] hold no images"
    with pytest.raises(DataError, match=message):
        download(folder_params(source), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []
    with pytest.raises(DataError, match=message):  # the split stage's reader, on a copy in data/raw
        read_imagefolder(source)


def test_a_fifo_inside_a_folder_source_is_refused_not_read(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 2})
    os.mkfifo(tmp_path / "src" / "train" / "cat" / "pipe.png")  # reading it would block for ever
    with pytest.raises(DataError, match=r"refused 'train/cat/pipe.png': device file, fifo or socket"):
        download(folder_params(tmp_path / "src"), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []


def test_a_one_class_dataset_is_refused(tmp_path):
    write_imagefolder(tmp_path / "src", classes=("cat",), per_class={"train": 10})
    with pytest.raises(DataError, match=r"1 class\(es\) \['cat'\]; a classifier needs at least 2"):
        run_stages(tmp_path / "src", tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_links_inside_an_archive_are_followed(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 4})
    os.symlink("0000.png", tmp_path / "src" / "train" / "cat" / "again.png")
    meta, _ = run_stages(make_tar(tmp_path / "src", tmp_path / "l.tar"), tmp_path, test_fraction=0.2)
    assert sum(meta["sizes"].values()) == 13


# --------------------------------------------------------------------------- unsafe and broken archives


@pytest.mark.parametrize(
    "kind, message",
    [
        ("dotdot", r"'\.\.' component"),
        ("absolute", "absolute path"),
        ("symlink", "points outside"),
        ("abs_symlink", "points outside"),
        ("hardlink", "points outside"),
        ("device", "device file"),
        ("fifo", "device file, fifo"),
    ],
)
def test_malicious_tar_is_refused(tmp_path, kind, message):
    arc = make_malicious_tar(tmp_path / "evil.tar.gz", kind)
    with pytest.raises(DataError, match=message):
        download(folder_params(arc), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []  # nothing, not even a temp folder
    with pytest.raises(DataError, match=message):  # the tarfile-based fallback reader too
        list(archives._iter_tarfile(arc, True))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("dotdot", r"'\.\.' component"),
        ("absolute", "absolute path"),
        ("backslash", r"'\.\.' component"),
        ("symlink", "points outside"),
    ],
)
def test_malicious_zip_is_refused(tmp_path, kind, message):
    arc = make_malicious_zip(tmp_path / "evil.zip", kind)
    with pytest.raises(DataError, match=message):
        download(folder_params(arc), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []


def test_directory_symlink_outside_is_refused(tmp_path):
    write_imagefolder(tmp_path / "src", per_class={"train": 2})
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", tmp_path / "src" / "train" / "cat" / "leak.png")
    with pytest.raises(DataError, match="points outside"):
        download(folder_params(tmp_path / "src"), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("suffix, compression", [(".tar.gz", "gz"), (".tar", ""), (".zip", None)])
def test_truncated_archive_is_refused(tmp_path, suffix, compression):
    write_imagefolder(tmp_path / "src", per_class={"train": 6, "test": 2})
    arc = tmp_path / f"full{suffix}"
    make_zip(tmp_path / "src", arc) if compression is None else make_tar(tmp_path / "src", arc, compression=compression)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(arc.read_bytes()[: arc.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match="truncated|corrupt"):
        download(folder_params(cut), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []
    if compression is not None:  # the tarfile-based fallback reader too
        with pytest.raises(DataError, match="truncated|corrupt"):
            list(archives._iter_tarfile(cut, True))


def test_not_an_archive_is_refused(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"<html>404 page from a proxy</html>" * 40)
    with pytest.raises(DataError, match="not a tar or zip archive"):
        download(folder_params(junk), tmp_path / "raw")
    with pytest.raises(DataError, match="not a tar or zip archive"):
        list(archives._iter_tarfile(junk, True))


def test_checksum_mismatch_is_refused(tmp_path, tiny_imagefolder_tgz):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DataError, match=f"checksum mismatch.*{sha256_of(tiny_imagefolder_tgz)}.*{wrong}"):
        download(folder_params(tiny_imagefolder_tgz, sha256=wrong), tmp_path / "out" / "raw")
    assert leftovers(tmp_path / "out") == []


def test_a_failed_download_keeps_no_stale_output(tmp_path, tiny_imagefolder_tgz):
    """Running again with a bad source replaces nothing: the old raw/ goes only when a new one is ready."""
    raw = tmp_path / "raw"
    download(folder_params(tiny_imagefolder_tgz), raw)
    before = (raw / "source.json").read_text()
    with pytest.raises(DataError):
        download(folder_params(tmp_path / "missing.tar.gz"), raw)
    assert (raw / "source.json").read_text() == before
    assert leftovers(tmp_path) == ["raw"]


def test_split_refuses_a_modified_raw_copy(tmp_path, tiny_imagefolder_tgz):
    params = folder_params(tiny_imagefolder_tgz)
    rec = download(params, tmp_path / "raw")
    with open(tmp_path / "raw" / rec["path"], "ab") as f:
        f.write(b"tampered")
    with pytest.raises(DataError, match="modified"):
        prepare(tmp_path / "raw", tmp_path / "prepared", params)
    with pytest.raises(DataError, match="holds dataset 'imagefolder' but data.dataset is 'cifar10'"):
        prepare(tmp_path / "raw", tmp_path / "prepared", data_params())


def test_missing_source_and_prepared_files_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="not found.*path of the archive"):
        download(folder_params(tmp_path / "nope.tar.gz"), tmp_path / "raw")
    with pytest.raises(DataError, match=r"source.json not found.*dvc repro -f download"):
        prepare(tmp_path / "raw", tmp_path / "prepared", data_params())
    with pytest.raises(DataError, match="dvc repro split"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="dvc repro split"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_split(tmp_path, "training")


SOURCE_RECORD_DAMAGE = {
    "garbage": "{not json",
    "missing": None,
    "a JSON list": "[1, 2]",
    "no path field": {"path": ...},
    "a path out of data/raw": {"path": "../prepared"},
    "an unknown kind": {"kind": "torrent"},
}


@pytest.mark.parametrize("damage", list(SOURCE_RECORD_DAMAGE))
def test_a_broken_source_json_stops_the_split_stage_in_one_line(tmp_path, tiny_imagefolder_tgz, damage):
    source = str(tiny_imagefolder_tgz)
    write_raw_params(tmp_path / "params.yaml", dataset="imagefolder", source=source, val_fraction=0.2)
    raw, prepared = tmp_path / "data" / "raw", tmp_path / "data" / "prepared"
    run_stages(tiny_imagefolder_tgz, tmp_path / "data", val_fraction=0.2)
    record = raw / "source.json"
    change = SOURCE_RECORD_DAMAGE[damage]
    if change is None:
        record.unlink()
    elif isinstance(change, str):
        record.write_text(change)
    else:
        fields = {k: v for k, v in {**json.loads(record.read_text()), **change}.items() if v is not ...}
        record.write_text(json.dumps(fields))
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}

    r = stage("split.py", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, r.stderr
    assert "data/raw/source.json" in errors[0] and "dvc repro -f download" in errors[0], errors[0]
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert leftovers(tmp_path / "data") == ["prepared", "raw"]


# --------------------------------------------------------------------------- network (127.0.0.1 only)


def test_unreachable_url_fails_fast_with_the_offline_hint(tmp_path):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        download(data_params(source=url, timeout=5), tmp_path / "out" / "raw")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert url in msg and "data.source" in msg and "dvc exp run -S data.dataset=imagefolder" in msg
    assert leftovers(tmp_path / "out") == []


def test_download_stage_reports_an_unreachable_url_in_one_line(tmp_path):
    write_raw_params(tmp_path / "params.yaml", source="http://127.0.0.1:9/cifar-10-python.tar.gz")
    r = stage("download.py", tmp_path, timeout=60)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "http://127.0.0.1:9/" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "data" / "raw").exists()


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; '/short/<file>' promises more bytes than it sends."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.startswith("/short/"):
                body = (www / self.path[len("/short/") :]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + 1000))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http(tmp_path, http_server, tiny_imagefolder_tgz):
    www, base = http_server
    shutil.copy(tiny_imagefolder_tgz, www / "tiny.tar.gz")
    rec = download(folder_params(f"{base}/tiny.tar.gz", sha256=sha256_of(tiny_imagefolder_tgz)), tmp_path / "raw")
    assert rec["path"] == "tiny.tar.gz" and rec["size"] == tiny_imagefolder_tgz.stat().st_size
    with pytest.raises(DataError, match="404"):
        download(folder_params(f"{base}/nothing.tar.gz"), tmp_path / "raw2")
    with pytest.raises(DataError, match="truncated"):
        download(folder_params(f"{base}/short/tiny.tar.gz"), tmp_path / "raw3")
    assert not (tmp_path / "raw2").exists() and not (tmp_path / "raw3").exists()


def test_a_silent_server_times_out_after_data_timeout(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        start = time.monotonic()
        with pytest.raises(DataError, match="timed out|no answer"):
            download(
                folder_params(f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar.gz", timeout=0.5), tmp_path / "raw"
            )
        assert time.monotonic() - start < 3
    finally:
        listener.close()


# --------------------------------------------------------------------------- the real DVC pipeline


def test_dvc_repro_split_then_nothing_to_do(tmp_path, tiny_imagefolder_tgz):
    if shutil.which("git") is None or not (BIN / "dvc").exists():
        pytest.skip("needs git and dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {k: pipeline["stages"][k] for k in ("download", "split")}
    # The code the two stages depend on, as dvc.yaml lists it (files and package folders).
    for rel in sorted({d for s in stages.values() for d in s["deps"] if d.startswith(("src/", "stages/"))}):
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, repo / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, repo / rel)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = repo_params(
        {"data.dataset": "imagefolder", "data.source": str(tiny_imagefolder_tgz), "data.val_fraction": 0.2}
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(dataclasses.asdict(params)))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "RESNET_NO_PROGRESS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
    }

    def run(*cmd: str) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
        return r

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    first = run(str(BIN / "dvc"), "repro", "split")
    assert "Running stage 'download'" in first.stdout and "Running stage 'split'" in first.stdout
    meta = load_meta(repo / "data" / "prepared")
    assert meta["sizes"] == {"train": 24, "val": 6, "test": 12}
    second = run(str(BIN / "dvc"), "repro", "split")
    assert "Running stage" not in second.stdout
    assert "Stage 'split' didn't change" in second.stdout or "up to date" in second.stdout


def test_relative_data_source_resolves_from_the_repository_in_dvc_temp_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet.data.sources import _source_kind

    (tmp_path / "archive.tar.gz").write_bytes(b"")
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpq1"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    monkeypatch.setenv("DVC_ROOT", str(temp_copy))
    assert _source_kind("archive.tar.gz") == ("path", tmp_path.resolve() / "archive.tar.gz")
