"""The MLflow UI, in a real headless browser, shows the pipeline's runs where the links say.

A real ``mlflow server`` on the pipeline's SQLite store (two runs that differ in
train.lr, logged through resnet.tracking as the stages log them) and Debian's Chromium:
the runs link opens the runs table, not MLflow 3's GenAI overview, and the compare view
shows both runs and the param that differs. The compare view's screenshot is the one in
the README: RESNET_SCREENSHOT_DIR=docs/images pytest tests/test_mlflow_ui.py renews it.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from paramsets import repo_params
from test_plots_page import _chromium
from test_tracking import META, _checkpoint, _images

from resnet import tracking
from resnet.tracking.ui import compare_url, curves_url, runs_url

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(dom: str) -> str:
    """The visible text of a dumped page: no scripts, no styles, no tags."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom[dom.find("<body") :], flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


class UI:
    def __init__(self, base: str, experiment_id: str, runs: dict[str, str], model_id: str) -> None:
        self.base, self.experiment_id, self.runs = base, experiment_id, runs  # runs: id -> name
        self.model_id = model_id  # the second run's logged (and registered) model


def _register(params_changes: dict) -> str:
    """The evaluate and register stages' MLflow part for run.json's run: its logged model's id."""
    params = repo_params(params_changes)
    figures = {"test_accuracy": 0.61, "test_loss": 1.1}
    _checkpoint(Path("models/best.pt"))
    with tracking.continue_run(params, "models/run.json", "evaluate") as run:
        run.log_results(figures)
    with tracking.continue_run(params, "models/run.json", "register") as run:
        result = tracking.register_checkpoint(
            run, "models/best.pt", _images(), "ui-test", "test_accuracy", figures, meta=META
        )
    return mlflow.MlflowClient().get_model_version("ui-test", str(result["version"])).source.removeprefix("models:/")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    chromium_missing = shutil.which("chromium") is None and os.environ.get("CI") != "true"
    if chromium_missing:
        pytest.skip("needs a headless chromium (apt-get install chromium); CI installs it")
    root = tmp_path_factory.mktemp("ui")
    cwd = os.getcwd()
    os.chdir(root)
    subprocess.run(["git", "init", "-q"], check=True)
    runs = {}
    try:
        for lr in (0.2, 0.05):
            with tracking.start_run(repo_params({"train.lr": lr}), META, "cpu", "models/run.json") as run:
                for epoch in (1, 2, 3):
                    run.log_epoch(epoch, {"epoch": epoch, "train_loss": 2.0 / epoch, "val_accuracy": 0.2 * epoch + lr})
                run.log_results({"best_val_accuracy": 0.6 + lr, "test_accuracy": 0.55 + lr})
            runs[run.run_id] = mlflow.get_run(run.run_id).info.run_name
            # Each run registers a version; the second is no better: champion v1, challenger v2.
            model_id = _register({"train.lr": lr})
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
    port = _free_port()
    server = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--host", "127.0.0.1"]
        + ["--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
                time.sleep(0.5)
        yield UI(base, run.experiment_id, runs, model_id)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _open(url: str, *extra: str) -> str:
    out = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1300"]
        + ["--virtual-time-budget=30000", *extra, url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_runs_link_opens_the_training_runs_not_the_genai_overview(ui: UI) -> None:
    text = _text(_open(runs_url(ui.base, ui.experiment_id), "--dump-dom"))
    for name in ui.runs.values():
        assert name in text, text[:3000]
    # What the experiment's bare page shows instead: MLflow's GenAI overview, without the runs.
    overview = _text(_open(f"{ui.base}/#/experiments/{ui.experiment_id}", "--dump-dom"))
    assert not any(name in overview for name in ui.runs.values()) and "Traces" in overview


def test_the_compare_view_shows_both_runs_and_the_param_that_differs(ui: UI, tmp_path: Path) -> None:
    url = compare_url(ui.base, ui.experiment_id, list(ui.runs))
    text = _text(_open(url, "--dump-dom"))
    assert "Comparing 2 Runs from 1 Experiment" in text, text[:3000]
    assert all(name in text for name in ui.runs.values())
    assert re.search(r"train\.lr 0\.2 0\.05", text), text[:3000]
    shot = tmp_path / "mlflow-compare.png"
    _open(url, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("RESNET_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["RESNET_SCREENSHOT_DIR"]) / shot.name)


def test_the_compare_view_shows_metric_names_and_values_and_each_runs_per_epoch_curve(ui: UI) -> None:
    text = _text(_open(compare_url(ui.base, ui.experiment_id, list(ui.runs)), "--dump-dom"))
    # The metrics table: the names, then each metric's value in both runs (best_val_accuracy 0.6 + lr,
    # the per-epoch series' last values, then test_accuracy and test_loss as the evaluate stage logged them).
    table = re.search(r"Metrics Show diff only (.*?) Artifacts", text)
    assert table, text[:4000]
    names = "best_val_accuracy epoch/train_loss epoch/val_accuracy test_accuracy test_loss"
    assert table.group(1) == f"{names} 0.8 0.65 0.667 0.667 0.8 0.65 0.61 0.61 1.1 1.1", table.group(1)
    # The compare view links each metric to its chart: the per-epoch curve of every run, step on the x axis.
    chart = _open(curves_url(ui.base, ui.experiment_id, list(ui.runs), "epoch/val_accuracy"), "--dump-dom")
    assert re.findall(r'<g class="trace scatter[^"]*"', chart), "no curve drawn"
    chart_text = _text(chart)
    assert "X-axis: Step" in chart_text, chart_text[:3000]
    for name, (first, last) in zip(ui.runs.values(), ((0.4, 0.8), (0.25, 0.65))):
        assert f"{name} (epoch/val_accuracy)" in chart_text, chart_text[:3000]  # its curve's legend
        # its latest and lowest value, at the epochs they were logged at: the series, not one number
        assert re.search(rf"{name} {last}\d* \(step=3\) {first} \(step=1\)", chart_text), chart_text[:3000]


def test_the_registered_model_page_shows_its_versions_and_aliases(ui: UI) -> None:
    text = _text(_open(f"{ui.base}/#/models/ui-test", "--dump-dom"))
    assert "ui-test" in text and "Version 1" in text and "Version 2" in text, text[:4000]
    # Each version's row: its number, registration time, tags (the gated figure first), then its alias.
    assert re.search(r"Version 1 .{0,400}? test_accuracy : 0\.61 .{0,400}? @ champion", text), text[:4000]
    assert re.search(r"Version 2 .{0,400}? test_accuracy : 0\.61 .{0,400}? @ challenger", text), text[:4000]


def test_the_logged_model_page_names_the_dataset_its_figures_were_measured_on(ui: UI) -> None:
    text = _text(_open(f"{ui.base}/#/experiments/{ui.experiment_id}/models/{ui.model_id}", "--dump-dom"))
    assert "imagefolder from archive.tar.gz (train/val/test 9/3/3)" in text, text[:4000]
    assert "resnet20-" in text  # named after the architecture and its run, not "model"


def test_make_ui_prints_the_links_and_refuses_a_store_without_runs(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).parents[1] / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    cmd = [sys.executable, "-m", "resnet.tracking.ui", "--links-only", "--port", "5111"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    none = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert none.returncode == 1 and "no MLflow store" in none.stderr and "make repro" in none.stderr
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ids = []
        for lr in (0.2, 0.05):
            with tracking.start_run(repo_params({"train.lr": lr}), META, "cpu", "models/run.json") as run:
                ids.append(run.run_id)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
    shown = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert f"training runs: {runs_url('http://127.0.0.1:5111', run.experiment_id)}" in shown.stdout
    assert compare_url("http://127.0.0.1:5111", run.experiment_id, ids[::-1]) in shown.stdout  # newest first
