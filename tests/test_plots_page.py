"""The page `dvc plots show` writes renders every chart offline, in a real headless browser.

DVC's own page loads vega from a CDN, so without network none of the charts renders
("vegaEmbed is not defined"); .dvc/config points DVC at vendor/dvc-plots/template.html,
which carries the scripts. Chromium (Debian's package; .ci/run installs it) opens the
page with every host unresolvable and a dead proxy, and the test counts what was drawn.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_experiments import DVC, ROOT, init_repo, tool_env

from resnet import paths
from resnet.training import HISTORY_FIELDS

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
CLASSES = ["cat", "dog", "ship"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("no chromium on this CI machine: .ci/run installs Debian's chromium package")
    pytest.skip("needs a headless chromium (apt-get install chromium); CI installs it")


def _plot_data(repo: Path) -> None:
    """The files the pipeline's plots draw, as the stages write them (a few rows each)."""
    for p in (paths.TRAIN_HISTORY, paths.VAL_CONFUSION, paths.TEST_CONFUSION):
        (repo / p).parent.mkdir(parents=True, exist_ok=True)
    with (repo / paths.TRAIN_HISTORY).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for e in (1, 2, 3):
            writer.writerow(dict.fromkeys(HISTORY_FIELDS, 1.0 / e) | {"epoch": e})
    pairs = [("cat", "cat"), ("dog", "cat"), ("dog", "dog"), ("ship", "ship")]
    splits = ((paths.VAL_CONFUSION, paths.VAL_PER_CLASS), (paths.TEST_CONFUSION, paths.TEST_PER_CLASS))
    for confusion, per_class in splits:
        (repo / confusion).write_text("actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in pairs))
        rows = "".join(f"{c},0.5,0.5,0.5,2\n" for c in CLASSES)
        (repo / per_class).write_text("class,precision,recall,f1,support\n" + rows)
    for png in (paths.TEST_CONFUSION_PNG, paths.TEST_MISCLASSIFIED_PNG):
        Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(repo / png)


def _render_offline(chromium: str, page: Path) -> str:
    """The page's DOM after its scripts ran, with no network at all."""
    out = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # root in CI
            "--disable-gpu",
            "--proxy-server=127.0.0.1:9",  # nothing listens there
            "--host-resolver-rules=MAP * ~NOTFOUND",  # and no name resolves
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _workspace(tmp_path: Path, with_config: bool) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "vendor", repo / "vendor")
    init_repo(repo)
    if with_config:
        shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    _plot_data(repo)
    return repo


@pytest.mark.parametrize("with_config", [True, False], ids=["project-config", "dvc-default"])
def test_every_chart_of_dvc_plots_show_renders_with_the_network_off(tmp_path: Path, with_config: bool) -> None:
    chromium = _chromium()
    repo = _workspace(tmp_path, with_config)
    shown = subprocess.run([DVC, "plots", "show"], cwd=repo, env=tool_env(), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    page = repo / "dvc_plots" / "index.html"
    dom = _render_offline(chromium, page)
    vega = [e for e in PIPELINE["plots"] if isinstance(e, dict)]
    images = [e for e in PIPELINE["plots"] if isinstance(e, str)]
    # vega-embed marks each container it filled and draws into a canvas.
    drawn = min(dom.count('class="vega-embed'), dom.count("<canvas"))
    shown_images = re.findall(r'<img src="(static/[^"]+\.png)"', dom)
    if with_config:
        assert "cdn.jsdelivr" not in page.read_text()
        assert drawn == len(vega) == 8, (drawn, len(vega))
        assert len(shown_images) == len(images) == 2 and all((page.parent / i).is_file() for i in shown_images)
    else:
        # DVC's own page, for contrast: the same charts, none drawn without the CDN. If this
        # ever draws, DVC bundles the scripts itself and the vendored template can go.
        assert drawn == 0


def test_the_template_carries_the_script_versions_dvc_asks_the_cdn_for() -> None:
    from dvc_render.vega import VegaRenderer

    asked = dict(re.findall(r"npm/(vega(?:-lite|-embed)?)@([\d.]+)", VegaRenderer.SCRIPTS))
    template = (ROOT / "vendor" / "dvc-plots" / "template.html").read_text()
    carried = dict(re.findall(r"/\* (vega(?:-lite|-embed)?) ([\d.]+) \(BSD-3-Clause\) \*/", template))
    assert carried == asked == {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC's CDN tags go nowhere
