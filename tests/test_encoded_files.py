"""resnet.data.encoded: an image folder's files stay on disk until decoded, whatever the source's form."""

from __future__ import annotations

import errno
import os
import resource
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from archives import make_tar, make_zip, write_imagefolder

from resnet.data import encoded
from resnet.data.datasets import index_imagefolder
from resnet.data.encoded import EncodedFiles

MB = 2**20


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, Path]]:
    """16 files of 1 MB random bytes (gzip cannot shrink them) and a link, as a folder, a .tar.gz and a .zip."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(16):
        name = f"train/c{i % 2}/{i:04d}.bin"
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        truth[name] = rng.integers(0, 256, MB, dtype=np.uint8).tobytes()
        (root / "src" / name).write_bytes(truth[name])
    os.symlink("0002.bin", root / "src" / "train" / "c0" / "again.bin")
    truth["train/c0/again.bin"] = truth["train/c0/0002.bin"]
    sources = {"dir": root / "src", "tar.gz": make_tar(root / "src", root / "src.tar.gz")}
    sources["zip"] = make_zip(root / "src", root / "src.zip")
    return truth, sources


@pytest.mark.parametrize("kind", ["dir", "tar.gz", "zip"])
def test_indexing_holds_names_not_files_and_lookups_give_the_files(big_sources, kind):
    truth, sources = big_sources
    tracemalloc.start()
    try:
        files = EncodedFiles(sources[kind])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Holding the 17 MB of files would peak above it; one member at a time (and the readers' buffers) stays far below.
    assert peak < 6 * MB, f"indexing a {kind} source peaked at {peak / MB:.1f} MB of Python memory"
    assert sorted(files) == sorted(truth)
    assert set(files.folders) >= {"train/", "train/c0/", "train/c1/"}
    for name in reversed(sorted(truth)):  # not the archive's order
        assert files[name] == truth[name], name
    with pytest.raises(KeyError):
        files["train/c0/missing.bin"]


def test_an_archive_copy_leaves_nothing_on_disk(big_sources):
    _, sources = big_sources
    folder = sources["tar.gz"].parent
    before = sorted(os.listdir(folder))
    files = EncodedFiles(sources["tar.gz"])
    assert sorted(os.listdir(folder)) == before  # the copy has no name
    fd = files._spill.fileno()
    assert os.fstat(fd).st_size == 16 * MB  # the link is not copied twice
    files.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_an_unwritable_archive_folder_falls_back_to_the_temporary_folder(big_sources, monkeypatch, caplog):
    _, sources = big_sources
    made = []
    real = tempfile.TemporaryFile

    def temporary_file(dir=None):  # noqa: A002  (tempfile's own name)
        made.append(dir)
        if dir is not None:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real()

    monkeypatch.setattr(encoded.tempfile, "TemporaryFile", temporary_file)
    files = EncodedFiles(sources["zip"])
    assert made == [sources["zip"].parent, None]
    assert "cannot write a temporary file there" in caplog.text
    assert files["train/c1/0001.bin"] == (sources["dir"] / "train/c1/0001.bin").read_bytes()


def test_a_full_disk_during_the_copy_is_a_storage_error_naming_the_copy(big_sources):
    _, sources = big_sources
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * MB, hard))  # CPython ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError) as err:
            EncodedFiles(sources["tar.gz"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG
    assert err.value.filename == str(sources["tar.gz"].parent / "<temporary copy of src.tar.gz's files>")


def test_index_imagefolder_decodes_an_archive_as_its_folder(tmp_path):
    """Each image from its span of the copy: the same pixels, any order, as the folder read in place."""
    truth = write_imagefolder(tmp_path / "src", per_class={"train": 5, "test": 2})
    tgz = index_imagefolder(make_tar(tmp_path / "src", tmp_path / "a.tar.gz"))
    folder = index_imagefolder(tmp_path / "src")
    order = np.array([14, 0, 7, 3, 9])
    np.testing.assert_array_equal(tgz.decode("train", order), truth["train"][0][order])
    np.testing.assert_array_equal(tgz.decode("train", order), folder.decode("train", order))
    np.testing.assert_array_equal(tgz.decode("test"), truth["test"][0])
