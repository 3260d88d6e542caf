"""Storage failures and special files: one ERROR line, exit status 1, nothing half-written.

A full disk is simulated with a file-size limit (``RLIMIT_FSIZE`` in the stage's
process): CPython ignores SIGXFSZ, so a write past the limit raises OSError EFBIG
("File too large"), as a full disk raises ENOSPC. Each case runs ``python
stages/<stage>.py`` exactly as DVC does, in a workspace holding an earlier run's
outputs, which must stay as they were; no temporary file may be left behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from archives import make_tar, write_imagefolder
from paramsets import PARAMS_FILE, REPO
from test_training import write_stage_inputs

from resnet.checkpoint import save_checkpoint
from resnet.config import load_params
from resnet.data.sources import download
from resnet.data.split import prepare
from resnet.stage import storage_error_message

EFBIG_LINE = "File too large [errno 27]; free disk space (or raise the file-size limit"


def _file_size_limit(limit: int):  # noqa: ANN202  (a preexec_fn)
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_stage(name: str, cwd: Path, *, fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python stages/<name>.py`` in cwd, with a file-size limit of ``fsize`` bytes if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")],
        cwd=cwd,
        env={**env, "RESNET_NO_PROGRESS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_file_size_limit(fsize) if fsize else None,
    )


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 1, no traceback, exactly one ERROR line holding every needle; returns it."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (the MLflow store aside) and its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("mlflow.db")
    }


def temp_files(root: Path) -> list[str]:
    """Temporary files and folders of atomic_path / atomic_dir (``.<name>.<random>.tmp``, ``.old``)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name.endswith((".tmp", ".old")))


def write_params(root: Path, **data: object) -> None:
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["data"].update(dataset="imagefolder", sha256=None, max_per_class=None, **data)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def data_workspace(tmp_path: Path) -> Path:
    """A workspace after a good download and split of a small image folder (tar.gz of 3 classes)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    write_imagefolder(tmp_path / "small", per_class={"train": 6, "test": 2})
    make_tar(tmp_path / "small", tmp_path / "small.tar.gz")
    write_params(ws, source=str(tmp_path / "small.tar.gz"), image_size=None, val_fraction=0.2)
    params = load_params(ws / "params.yaml").data  # in-process: the stages' work, without their start-up
    download(params, ws / "data" / "raw")
    prepare(ws / "data" / "raw", ws / "data" / "prepared", params)
    return ws


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_download_past_the_file_size_limit_is_one_line_and_keeps_the_earlier_copy(
    data_workspace: Path, tmp_path: Path, kind: str
) -> None:
    # 160x160 noise PNGs (about 75 KB each) do not compress: each file and the archive are over 64 KiB.
    write_imagefolder(tmp_path / "big", per_class={"train": 2}, size=160)
    source = tmp_path / "big" if kind == "folder" else make_tar(tmp_path / "big", tmp_path / "big.tar.gz")
    write_params(data_workspace, source=str(source), image_size=None, val_fraction=0.2)
    before = snapshot(data_workspace / "data")

    proc = run_stage("download", data_workspace, fsize=64 * 1024)
    copied = "data/raw/big.tar.gz" if kind == "archive" else "data/raw/big/train/cat/0000.png"
    one_error_line(proc, f"cannot write {copied}: {EFBIG_LINE}", "dvc repro")
    assert snapshot(data_workspace / "data") == before
    assert temp_files(data_workspace) == []


def test_split_past_the_file_size_limit_is_one_line_and_keeps_the_earlier_split(data_workspace: Path) -> None:
    # 30 train-pool images at 64x64: train.npz is about 290 KB, over a 128 KiB limit.
    params = yaml.safe_load((data_workspace / "params.yaml").read_text())
    params["data"]["image_size"] = 64
    (data_workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = snapshot(data_workspace / "data")

    proc = run_stage("split", data_workspace, fsize=128 * 1024)
    one_error_line(proc, f"cannot write data/prepared/train.npz: {EFBIG_LINE}")
    assert snapshot(data_workspace / "data") == before
    assert temp_files(data_workspace) == []


def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_half_of_it_is_nowhere(tmp_path: Path) -> None:
    """A tiny training whose checkpoint (resnet20, about 2.2 MB) is over the limit; the MLflow store is under it."""
    (tmp_path / ".dvc").mkdir()  # the repository root, where the MLflow store goes
    write_stage_inputs(tmp_path, {"epochs": 1}, n_train=64, n_val=32, changes={"model.width_multiplier": 1.0})
    earlier = tmp_path / "metrics" / "train.json"
    earlier.parent.mkdir()
    earlier.write_text('{"best_val_accuracy": 0.5}\n')

    proc = run_stage("train", tmp_path, fsize=1536 * 1024)
    one_error_line(proc, f"cannot write models/best.pt: {EFBIG_LINE}")
    assert earlier.read_text() == '{"best_val_accuracy": 0.5}\n'
    assert not list((tmp_path / "models").glob("*.pt"))
    assert temp_files(tmp_path) == []


def test_save_checkpoint_turns_a_full_disk_into_an_oserror_naming_the_file(tmp_path: Path) -> None:
    """Not torch's "PytorchStreamWriter failed writing file" RuntimeError; the earlier checkpoint stays."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "epoch": 1})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(OSError) as err:
            save_checkpoint(path, {"model": {"w": torch.zeros(200_000)}, "epoch": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and err.value.filename == str(path)
    assert storage_error_message(err.value).startswith(f"cannot write {path}: {EFBIG_LINE}")
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "cannot write x/y.npz: No space left on device [errno 28]; free disk space and rerun"),
        (errno.EROFS, "cannot write x/y.npz: Read-only file system [errno 30]; run from a writable checkout"),
        (errno.EACCES, "cannot access x/y.npz: Permission denied [errno 13]; give this user access to it"),
    ],
)
def test_storage_error_message_names_the_file_the_reason_and_the_fix(code: int, message: str) -> None:
    line = storage_error_message(OSError(code, os.strerror(code), "x/y.npz"))
    assert line.startswith(message) and line.endswith("(dvc repro)") and "\n" not in line


def test_an_oserror_that_is_not_about_storage_keeps_its_traceback(tmp_path: Path) -> None:
    """A missing file the code took for granted is a bug to fix, not a message to read."""
    code = (
        "import sys\n"
        "from resnet.stage import run_stage\n"
        "def run(params):\n"
        "    open('no/such/file')\n"
        "sys.exit(run_stage(run))\n"
    )
    (tmp_path / "params.yaml").write_text(PARAMS_FILE.read_text())
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


# --------------------------------------------------------------------------- special files as data source


def _special_source(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(path, what the message calls it) for a data source that is not a regular file or folder."""
    if kind == "device":
        return Path("/dev/zero"), "character device"
    if kind == "link to a device":
        os.symlink("/dev/zero", tmp_path / "data.tar.gz")
        return tmp_path / "data.tar.gz", "character device"
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.tar.gz")
        return tmp_path / "pipe.tar.gz", "fifo"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.tar.gz"))  # stays bound until the test's process ends
    return tmp_path / "sock.tar.gz", "socket"


@pytest.mark.parametrize("kind", ["device", "link to a device", "fifo", "socket"])
def test_a_device_fifo_or_socket_as_data_source_is_refused_before_copying(tmp_path: Path, kind: str) -> None:
    source, what = _special_source(tmp_path, kind)
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(ws, source=str(source))
    # The limit only guards this machine's disk should the stage copy /dev/zero after all;
    # the timeout guards against a stage blocked reading the fifo.
    proc = run_stage("download", ws, fsize=16 * 2**20, timeout=120)
    one_error_line(proc, str(source), what, "must be a regular file (an archive) or a folder")
    assert sorted(p.name for p in ws.iterdir()) == ["params.yaml"]  # refused before any data/ was made
