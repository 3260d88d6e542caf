"""An MLflow store that cannot be used is one line naming it and the fix, before any work.

A folder that cannot be created, a file that is not a database, a store another
program holds locked: each through a stage's entry point (exit 1, one ERROR line, no
traceback, nothing written).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from test_evaluation import _output_files, _stage
from test_evaluation import workspace as workspace  # noqa: F401  (the fixture)
from test_handover_files import _one_line_error

from resnet import paths


def _use_store(uri: str) -> None:
    params = yaml.safe_load(paths.PARAMS.read_text())
    params["tracking"]["uri"] = uri
    paths.PARAMS.write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("kind", ["folder-is-a-file", "not-a-database", "locked"])
def test_an_unusable_store_is_one_line_naming_it(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    holder = None
    if kind == "folder-is-a-file":
        (workspace / "blocker").write_text("a file where the store's folder should be\n")
        db, needle = workspace / "blocker" / "mlflow.db", "its folder is missing or not writable"
    elif kind == "not-a-database":
        db, needle = workspace / "garbage.db", "not an intact MLflow store"
        db.write_bytes(b"this is not SQLite " * 100)
    else:
        db, needle = workspace / "mlflow.db", "holds it locked"
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # as an open sqlite3 shell in a write transaction does
    _use_store(f"sqlite:///{db}")
    before = _output_files(workspace)
    try:
        assert _stage("validate", monkeypatch).main() == 1
    finally:
        if holder is not None:
            holder.close()
    _one_line_error(caplog, f"MLflow store sqlite:///{db} is unusable", needle)
    assert _output_files(workspace) == before
