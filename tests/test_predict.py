"""Batch prediction: ``python -m resnet.predict`` over files, folders, globs and archives, into a CSV.

Against a real registered model (the serving tests' champion): the CSV rows equal the
pyfunc model's answers, unreadable files are skipped with a warning, images are read
and classified ``--batch-size`` at a time, and a failure leaves no CSV behind.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from archives import make_tar, make_zip, png_bomb
from paramsets import repo_params
from PIL import Image
from test_serving import _env, _local_model
from test_serving import champion as champion  # noqa: F401  (the fixture)

from resnet import predict


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Images of several sizes and modes in a folder tree, a tar.gz and a zip of it, and bad files."""
    rng = np.random.default_rng(0)
    tree = tmp_path / "photos"
    (tree / "sub").mkdir(parents=True)
    for i, (size, mode) in enumerate([((16, 16), "RGB"), ((40, 24), "RGB"), ((20, 20), "L"), ((16, 16), "RGB")]):
        shape = (*size, 3) if mode == "RGB" else size
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        image.save(tree / ("sub" if i % 2 else "") / f"img{i}.{'png' if i < 2 else 'jpg'}")
    (tree / "notes.txt").write_text("not an image, and not named like one: not read\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (bad / "bomb.png").write_bytes(png_bomb())
    return {
        "tree": tree,
        "tar": make_tar(tree, tmp_path / "photos.tar.gz"),
        "zip": make_zip(tree, tmp_path / "photos.zip"),
        "bad": bad,
    }


@pytest.fixture()
def store(champion: dict, tmp_path: Path) -> list[str]:  # noqa: F811
    """``--model`` and ``--params`` for the champion: a params.yaml whose tracking.uri is its store."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(repo_params({"tracking.uri": champion["store"]}))))
    return ["--model", champion["uri"], "--params", str(params)]


def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def _expected(champion: dict, files: list[Path]) -> list[tuple[str, float]]:  # noqa: F811
    """(label, confidence) of each file from the pyfunc model itself."""
    table = predict.predict_files(_local_model(champion), files)
    return list(zip(table["label"], table["confidence"]))


def test_folders_globs_and_archives_stream_into_a_csv_equal_to_the_models_answers(
    champion: dict,  # noqa: F811
    store: list[str],
    inputs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    out = tmp_path / "preds.csv"
    glob_arg = str(inputs["tree"] / "**" / "*.jpg")
    argv = [*store, "--batch-size", "3", "--top-k", "2", "-o", str(out)]
    argv += [str(inputs["tree"]), glob_arg, str(inputs["tar"]), str(inputs["zip"]), str(inputs["bad"])]
    assert predict.main(argv) == 0
    rows = _rows(out.read_text())
    assert rows[0] == ["path", "label", "confidence", "top1_label", "top1_prob", "top2_label", "top2_prob"]
    files = sorted(p for p in inputs["tree"].rglob("*") if p.suffix in (".png", ".jpg"))
    jpgs = [p for p in files if p.suffix == ".jpg"]
    names = [r[0] for r in rows[1:]]
    members = [f"{inputs['tar']}!{p.relative_to(inputs['tree']).as_posix()}" for p in files]
    assert names[: len(files)] == [str(p) for p in files] and names[len(files) : len(files) + len(jpgs)] == [
        str(p) for p in jpgs
    ]
    assert names[len(files) + len(jpgs) : 2 * len(files) + len(jpgs)] == members
    assert len(names) == 3 * len(files) + len(jpgs)  # the zip's members too; no text file, no bad file
    want = _expected(champion, files)
    for row, (label, conf) in zip(rows[1 : len(files) + 1], want):
        assert row[1] == label == row[3] and float(row[2]) == pytest.approx(conf, abs=1e-6)
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(skipped) == 2 and all(m.startswith("skipped: cannot read image ") for m in skipped)
    assert any("corrupt.png" in m for m in skipped) and any("89,478,485" in m for m in skipped)
    assert f"classified {len(names)} images, skipped 2 (listed above) -> {out}" in caplog.text


def test_images_are_read_and_classified_a_batch_at_a_time(
    store: list[str], inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Never more than --batch-size images decoded and not yet written, whatever the input's size."""
    in_flight, peak, calls = [0], [0], []
    decode = predict.preprocess.decode

    def counting_decode(data: bytes) -> np.ndarray:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        return decode(data)

    real_predict = predict.predict_images

    def counting_predict(model: object, images: list) -> object:
        calls.append(len(images))
        in_flight[0] -= len(images)
        return real_predict(model, images)

    monkeypatch.setattr(predict.preprocess, "decode", counting_decode)
    monkeypatch.setattr(predict, "predict_images", counting_predict)
    argv = [*store, "--batch-size", "2", "-o", str(tmp_path / "p.csv")]
    assert predict.main(argv + [str(inputs["tree"])] * 3) == 0
    assert calls == [2] * 6 and peak[0] == 2


def test_failures_are_one_line_and_leave_no_csv(
    store: list[str],
    inputs: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "preds.csv"
    base = [*store, "-o", str(out)]
    cases = {
        "missing input": ([str(tmp_path / "nope.png")], "does not exist"),
        "a glob matching nothing": ([str(tmp_path / "*.webp")], "matches no file"),
        "nothing readable": ([str(inputs["bad"])], "no image could be classified (2 skipped"),
    }
    for what, (args, needle) in cases.items():
        caplog.clear()
        assert predict.main(base + args) == 1, what
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and needle in errors[0], (what, errors)
        assert not out.exists() and not list(tmp_path.glob(".preds.csv*")), what
    caplog.clear()
    # No params file: the default store, mlflow.db at the repository root; here tmp_path's, not the checkout's.
    monkeypatch.chdir(tmp_path)
    assert predict.main(["--model", "models:/nope@champion", "--params", "none.yaml", str(inputs["tree"])]) == 1
    assert "nope" in caplog.text


def test_the_command_writes_csv_to_standard_output(champion: dict, inputs: dict[str, Path]) -> None:  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-m", "resnet.predict", "--model", champion["uri"], str(inputs["zip"])],
        cwd=champion["root"],
        env=_env(champion["store"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(proc.stdout)
    assert len(rows) == 5 and all(r[0].startswith(f"{inputs['zip']}!") for r in rows[1:])
    assert "classified 4 images, skipped 0 -> standard output" in proc.stderr
