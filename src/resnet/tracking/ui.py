"""``make ui``: the MLflow UI on the pipeline's store, with links straight to its training runs.

MLflow 3's UI opens an experiment on its GenAI overview (traces, token usage), where a
training pipeline has nothing to show; the runs are one click away under "Model
training". This prints the links that skip it, the experiment's runs table and the
compare view of its latest runs, then serves the UI (``mlflow server`` on the store;
for a team server, MLFLOW_TRACKING_URI or tracking.uri, it only prints its links).

    python -m resnet.tracking.ui [--port 5000] [--host 127.0.0.1] [--links-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import urllib.parse
from collections.abc import Sequence

import mlflow

from resnet.config import load_params
from resnet.tracking.store import point_mlflow_at, resolve_tracking_uri, sqlite_path
from resnet.utils import PipelineError, setup_logging

__all__ = ["runs_url", "compare_url", "curves_url", "main"]


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's table of training runs in the UI at ``base``."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The UI's compare view of ``run_ids``: parameters side by side, metric charts."""
    compact = {"separators": (",", ":")}
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(run_ids), **compact), "experiments": json.dumps([experiment_id], **compact)}
    )
    return f"{base.rstrip('/')}/#/compare-runs?{query}"


def curves_url(base: str, experiment_id: str, run_ids: Sequence[str], metric: str) -> str:
    """The UI's chart of ``metric`` over the steps (epochs) of every run in ``run_ids``.

    What a metric's name links to in the compare view; the query is the one the UI itself
    builds (its ``getMetricPageRoute``): a bare ``#/metric`` URL is refused as invalid.
    """
    compact = {"separators": (",", ":")}
    query = {
        "runs": json.dumps(list(run_ids), **compact),
        "metric": json.dumps(metric),
        "experiments": json.dumps([experiment_id], **compact),
        "plot_metric_keys": json.dumps([metric], **compact),
        "plot_layout": "{}",
        "x_axis": "step",
        "y_axis_scale": "linear",
        "line_smoothness": "1",
        "show_point": "false",
        "deselected_curves": "[]",
        "last_linear_y_axis_range": "[]",
    }
    return f"{base.rstrip('/')}/#/metric?{urllib.parse.urlencode(query)}"


def _links(base: str, experiment: str) -> list[str]:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise PipelineError(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()} yet: run the pipeline first")
    latest = mlflow.search_runs([exp.experiment_id], max_results=2, order_by=["attributes.start_time DESC"])
    links = [f"training runs: {runs_url(base, exp.experiment_id)}"]
    if len(latest) == 2:
        ids = list(latest["run_id"])
        links.append(f"latest two compared: {compare_url(base, exp.experiment_id, ids)}")
        links.append(
            f"their validation accuracy per epoch: {curves_url(base, exp.experiment_id, ids, 'epoch/val_accuracy')}"
        )
    return links


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet.tracking.ui", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--links-only", action="store_true", help="print the links, start no server")
    args = p.parse_args(argv)
    setup_logging()
    params = load_params("params.yaml")
    uri = resolve_tracking_uri(params.tracking)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        print(f"no MLflow store at {db} yet: run the pipeline first (make repro)", file=sys.stderr)
        return 1
    point_mlflow_at(uri)
    base = f"http://{args.host}:{args.port}" if db is not None else uri
    try:
        links = _links(base, params.tracking.experiment)
    except PipelineError as e:
        print(e, file=sys.stderr)
        return 1
    print("\n".join(links), flush=True)
    if args.links_only or db is None:
        return 0
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    # The server replaces this process: Ctrl-C stops it as it would stop `mlflow server` itself.
    server = [mlflow_bin, "server", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    os.execv(mlflow_bin, server)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
