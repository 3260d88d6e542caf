"""``mlflow models serve`` of the registered champion, for real: a server process on loopback.

* JSON requests with real images (RGB of the training size, another size, grayscale)
  get the predictions ``mlflow.pyfunc.load_model(...).predict`` gives.
* Malformed requests (wrong rank, empty, non-numbers, floats in [0, 1], out-of-range
  values, four channels, a table) get a short 400 answer naming the problem: never a 500,
  never a traceback, never the input echoed back.
* ``mlflow models generate-dockerfile`` writes a Dockerfile for the champion (building it
  needs a Docker engine, which these machines lack).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from paramsets import repo_params
from test_tracking import META, _checkpoint

from resnet import tracking

MLFLOW = str(Path(sys.executable).parent / "mlflow")
MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A registered champion (resnet20 at width 1/4, 3 classes, 16x16) in a SQLite store."""
    root = tmp_path_factory.mktemp("serving")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        subprocess.run(["git", "init", "-q"], check=True)
        params = repo_params()
        _checkpoint(Path("models/best.pt"))
        with tracking.start_run(params, META, "cpu", "models/run.json"):
            pass
        with tracking.continue_run(params, "models/run.json", "register") as run:
            uri = tracking.log_model(run, "models/best.pt", np.zeros((2, 16, 16, 3), dtype=np.uint8))
            tracking.register_model(run, uri, MODEL, "test_accuracy", {"test_accuracy": 0.9})
        store = tracking.resolve_tracking_uri(params.tracking)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            os.environ.pop(var, None)
    return {"root": root, "store": store, "uri": f"models:/{MODEL}@champion"}


def _env(store: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def server(champion: dict) -> Iterator[str]:
    port = _free_port()
    log = (champion["root"] / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            MLFLOW,
            "models",
            "serve",
            "-m",
            champion["uri"],
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=champion["root"],
        env=_env(champion["store"]),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (champion["root"] / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /ping in 180 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _post(url: str, body: object) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _local_model(champion: dict) -> object:
    mlflow.set_tracking_uri(champion["store"])
    mlflow.set_registry_uri(champion["store"])
    return mlflow.pyfunc.load_model(champion["uri"])


def test_served_predictions_equal_the_loaded_model(champion: dict, server: str) -> None:
    rng = np.random.default_rng(1)
    batches = {
        "rgb at the training size": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
        "rgb of another size": rng.integers(0, 256, (2, 40, 24, 3), dtype=np.uint8),
        "grayscale": rng.integers(0, 256, (2, 20, 20, 1), dtype=np.uint8),
    }
    model = _local_model(champion)
    for what, images in batches.items():
        status, answer = _post(server, {"inputs": images.tolist()})
        assert status == 200, (what, answer)
        served = answer["predictions"]
        expected = model.predict(images)
        assert [row["label"] for row in served] == list(expected["label"]), what
        got = np.array([[row[c] for c in expected.columns if c.startswith("prob_")] for row in served])
        want = expected.filter(like="prob_").to_numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=what)


BAD = {
    "one image without the batch dimension": ({"inputs": np.zeros((16, 16, 3), int).tolist()}, "wrap it in a list"),
    "a flat list": ({"inputs": [1, 2, 3]}, "expected images (N, H, W, C)"),
    "no image": ({"inputs": []}, "expected images"),
    "strings": ({"inputs": [[[["a", "b", "c"]]]]}, "must be numbers"),
    "floats in [0, 1]": ({"inputs": np.full((1, 4, 4, 3), 0.5).tolist()}, "multiply by 255 and round"),
    "values over 255": ({"inputs": np.full((1, 4, 4, 3), 300).tolist()}, "must be 0..255"),
    "negative values": ({"inputs": np.full((1, 4, 4, 3), -1).tolist()}, "must be 0..255"),
    "four channels": ({"inputs": np.zeros((1, 8, 8, 4), int).tolist()}, "images[..., :3]"),
    # Refused by MLflow's own JSON parsing, before the model, as briefly.
    "ragged images": ({"inputs": [[[[1, 2, 3]]], [[[1, 2, 3], [4, 5, 6]]]]}, "inhomogeneous"),
    "a table": ({"dataframe_split": {"columns": ["a"], "data": [[1]]}}, "not a table"),
    "not JSON": (b"{not json", ""),
}


@pytest.mark.parametrize("what", list(BAD))
def test_malformed_requests_get_a_short_400_without_traceback(server: str, what: str) -> None:
    body, needle = BAD[what]
    status, answer = _post(server, body)
    assert status == 400, (what, status, answer)
    assert isinstance(answer, str) and len(answer) < 600, (what, len(str(answer)), answer)
    assert "Traceback" not in answer and "stack_trace" not in answer, answer
    assert needle in answer, answer


def test_generate_dockerfile_for_the_champion(champion: dict, tmp_path: Path) -> None:
    out = tmp_path / "docker"
    proc = subprocess.run(
        [MLFLOW, "models", "generate-dockerfile", "-m", champion["uri"], "-d", str(out), "--env-manager", "local"],
        cwd=champion["root"],
        env=_env(champion["store"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dockerfile = (out / "Dockerfile").read_text()
    assert "mlflow.models.container" in dockerfile or "ENTRYPOINT" in dockerfile, dockerfile
    # The model travels inside the build context, with its code and checkpoint.
    assert list(out.rglob("MLmodel")) and list(out.rglob("best.pt")), sorted(map(str, out.rglob("*")))[:20]


def test_model_config_sets_the_batch_size_and_falls_back_to_the_cpu(
    champion: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """A large request runs batch_size images at a time (the same answer); cuda without a GPU runs on the CPU."""
    images = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    default = _local_model(champion).predict(images)
    small = mlflow.pyfunc.load_model(champion["uri"], model_config={"batch_size": 2})
    inner = small.unwrap_python_model()
    sizes: list[int] = []
    inner.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    got = small.predict(images)
    assert list(got["label"]) == list(default["label"])
    # Other batch shapes take other kernels: equal up to float rounding.
    np.testing.assert_allclose(got.filter(like="prob_"), default.filter(like="prob_"), rtol=0, atol=1e-6)
    assert sizes == [2, 2, 1]
    if not torch.cuda.is_available():
        on_gpu = mlflow.pyfunc.load_model(champion["uri"], model_config={"device": "cuda"})
        assert on_gpu.unwrap_python_model().device.type == "cpu" and "no CUDA GPU here" in caplog.text
    with pytest.raises(Exception, match="not a device"):
        mlflow.pyfunc.load_model(champion["uri"], model_config={"device": "gpu"})
