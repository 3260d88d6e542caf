"""MLflow tracking against a real SQLite store on disk: runs, the pyfunc model, the registry."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from paramsets import data_params, repo_params
from PIL import Image

from resnet import predict, runtime, tracking
from resnet.checkpoint import save_checkpoint
from resnet.config import to_flat_dict
from resnet.data.sources import download
from resnet.data.split import prepare
from resnet.data.store import load_split
from resnet.evaluation import evaluate
from resnet.loader import DeviceLoader
from resnet.models import build_model
from resnet.tta import tta_logits

CLASSES = ["cat", "dog", "ship"]
META = {
    "dataset": "imagefolder",
    "source": "archive.tar.gz",
    "source_sha256": "ab" * 32,
    "content_sha256": "cd" * 32,
    "sizes": {"train": 9, "val": 3, "test": 3},
    "val_fraction": 0.25,
    "max_per_class": None,
    "seed": 0,
    "test_split": "archive",
}


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository as the working directory (conftest isolates the MLflow variables)."""
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    return tmp_path


def _checkpoint(path: Path, seed: int = 0, tta: str | None = None) -> torch.nn.Module:
    """A tiny resnet20 checkpoint; ``tta`` None writes none (as checkpoints older than model.tta)."""
    torch.manual_seed(seed)
    model = build_model("resnet20", len(CLASSES), width_multiplier=0.25).eval()
    save_checkpoint(
        path,
        {
            "arch": {
                "name": "resnet20",
                "num_classes": len(CLASSES),
                "in_channels": 3,
                "options": {"width_multiplier": 0.25},
                **({"tta": tta} if tta else {}),
            },
            "model": model.state_dict(),
            "classes": CLASSES,
            "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.25, 0.3],
            "image_size": [16, 16],
            "epoch": 1,
        },
    )
    return model


def _images(n: int = 6, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_store_resolves_to_the_real_repo_from_dvc_temp_copies(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(temp_copy))
    assert tracking.store_root() == repo.resolve()
    assert tracking.resolve_tracking_uri(repo_params().tracking) == f"sqlite:///{repo.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(repo_params().tracking) == "http://127.0.0.1:5000"


def system_metrics_of_a_training(on: bool, seconds: float = 3.5) -> dict[str, float]:
    """The system/* metrics of a run held open ``seconds`` as the train stage holds it, sampled every second."""
    params = repo_params({"tracking.system_metrics": on, "tracking.system_metrics_interval": 1})
    with tracking.start_run(params, META, "cpu", "models/run.json") as run:
        time.sleep(seconds)
    metrics = MlflowClient().get_run(run.run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("system/")}


def test_system_metrics_are_logged_while_training_and_switched_off_by_the_param(repo: Path) -> None:
    on = system_metrics_of_a_training(True)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(on), sorted(on)
    assert 0 <= on["system/cpu_utilization_percentage"] <= 100 and on["system/system_memory_usage_megabytes"] > 0
    assert system_metrics_of_a_training(False, seconds=1.5) == {}


def test_one_run_across_stages_with_params_tags_and_curves(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    # A CPU with native bf16, where train.precision auto resolves to bf16.
    cpu = ("AMD EPYC 9R14 96-Core Processor", frozenset({"sse2", "avx2", "fma", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(runtime, "cpu_info", lambda: cpu)
    params = repo_params({"train.precision": "auto"})
    with tracking.start_run(params, META, "cpu", "models/run.json") as run:
        for epoch in (1, 2, 3):
            run.log_epoch(epoch, {"epoch": epoch, "train_loss": 1.0 / epoch, "val_accuracy": 0.3 * epoch})
    saved = json.loads(Path("models/run.json").read_text())
    assert saved["run_id"] == run.run_id and saved["tracking_uri"].endswith(f"{repo.resolve()}/mlflow.db")

    with tracking.continue_run(params, "models/run.json", "register") as cont:
        cont.log_results({"test_accuracy": 0.5, "test_checkpoint": "models/best.pt", "resumed_from_epoch": None})
    assert cont.run_id == run.run_id

    client = MlflowClient(saved["tracking_uri"])
    data = client.get_run(run.run_id)
    assert data.info.run_name == "brisk-lark" and data.info.status == "FINISHED"
    assert data.data.params["train.lr"] == str(params.train.lr)
    assert set(data.data.params) == set(to_flat_dict(params))
    # As params.yaml writes them, not as Python prints them.
    assert (data.data.params["train.grad_clip"], data.data.params["train.nesterov"]) == ("null", "true")
    assert data.data.params["train.milestones"] == "[]"
    assert data.data.tags["dvc.experiment"] == "brisk-lark"
    assert data.data.tags["dataset.sha256"] == META["source_sha256"]
    assert data.data.tags["device"].startswith("cpu")
    # What train.precision asked for (the param) and resolved to (the tag), and the CPU it was decided on.
    assert (data.data.params["train.precision"], data.data.tags["precision"]) == ("auto", "bf16")
    assert data.data.tags["cpu.model"] == "AMD EPYC 9R14 96-Core Processor"
    assert data.data.tags["cpu.flags"] == "avx2 fma avx512f avx512_bf16"  # the speed-relevant ones, in a fixed order
    assert data.data.metrics["test_accuracy"] == 0.5
    assert data.data.tags["test_checkpoint"] == "models/best.pt" and "resumed_from_epoch" not in data.data.metrics
    history = client.get_metric_history(run.run_id, "epoch/train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    # The input: the prepared data by its content digest, the archive by its absolute location,
    # the archive's full checksum and the split params in the input's tags.
    (dataset_input,) = data.inputs.dataset_inputs
    assert dataset_input.dataset.name == "imagefolder from archive.tar.gz (train/val/test 9/3/3)"
    assert dataset_input.dataset.digest == META["content_sha256"][:32]
    assert json.loads(dataset_input.dataset.source)["uri"] == (repo.resolve() / "archive.tar.gz").as_uri()
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["source_sha256"] == META["source_sha256"] and tags["content_sha256"] == META["content_sha256"]
    assert (tags["val_fraction"], tags["max_per_class"], tags["seed"]) == ("0.25", "None", "0")
    # Artifacts sit beside the embedded store, not wherever the stage ran.
    assert mlflow.get_experiment(data.info.experiment_id).artifact_location == (repo.resolve() / "mlartifacts").as_uri()


def _commit_all(repo: Path) -> str:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "state"], check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_a_plain_repro_run_is_named_from_commit_and_params_and_dirty_means_code(repo: Path) -> None:
    for f in ("params.yaml", "dvc.lock", "metrics/val.json", "src/resnet/models.py"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("1\n")
    commit = _commit_all(repo)
    # What dvc exp run and the stages write: params.yaml, dvc.lock, git-tracked metrics. Not code.
    for f in ("params.yaml", "dvc.lock", "metrics/val.json"):
        (repo / f).write_text("2\n")
    names = []
    for lr in (0.2, 0.05):
        with tracking.start_run(repo_params({"train.lr": lr}), META, "cpu", "models/run.json") as run:
            pass
        data = mlflow.get_run(run.run_id)
        names.append(data.info.run_name)
        assert data.data.tags["git.dirty"] == "false" and "git.dirty_files" not in data.data.tags
    default = repo_params()
    pattern = rf"repro-{commit[:7]}-{default.model.name}-e{default.train.epochs}-lr%s-[0-9a-f]{{6}}"
    assert re.fullmatch(pattern % "0.2", names[0]) and re.fullmatch(pattern % "0.05", names[1]), names

    (repo / "src/resnet/models.py").write_text("2\n")  # a code change
    with tracking.start_run(repo_params({"train.lr": 0.05}), META, "cpu", "models/run.json") as run:
        pass
    data = mlflow.get_run(run.run_id)
    assert data.info.run_name == names[1].replace(commit[:7], commit[:7] + "+")
    assert data.data.tags["git.dirty"] == "true" and data.data.tags["git.dirty_files"] == "src/resnet/models.py"


def test_interrupted_run_is_marked_killed_and_resumed(repo: Path) -> None:
    params = repo_params()
    with pytest.raises(KeyboardInterrupt), tracking.start_run(params, META, "cpu", "models/run.json") as run:
        run.log_epoch(1, {"train_loss": 2.0})
        raise KeyboardInterrupt
    assert mlflow.get_run(run.run_id).info.status == "KILLED"
    with tracking.start_run(params, META, "cpu", "models/run.json", resume_run_id=run.run_id) as again:
        again.log_epoch(2, {"train_loss": 1.0})
    assert again.run_id == run.run_id
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"
    assert len(MlflowClient().get_metric_history(run.run_id, "epoch/train_loss")) == 2


def test_nothing_is_logged_twice_at_one_step_and_the_table_shows_the_current_figure(repo: Path) -> None:
    params = repo_params()
    with tracking.start_run(params, META, "cpu", "models/run.json") as run:
        run.log_epoch(1, {"epoch": 1, "val_accuracy": 0.25, "images_per_sec": 64.0})
        run.log_epoch(1, {"epoch": 1, "val_accuracy": 0.25, "images_per_sec": 64.0})  # a resume re-sends it
        run.log_results({"val_accuracy": 0.3, "images_per_sec": 60.5, "stopped_early": False})
        run.log_results({"val_accuracy": 0.3, "images_per_sec": 60.5, "stopped_early": False})  # a rerun, same
        run.log_results({"val_accuracy": 0.4})  # the stage rerun on other params
    client = MlflowClient()

    def points(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.run_id, key)]

    assert points("epoch/val_accuracy") == [(1, 0.25)] and points("epoch/images_per_sec") == [(1, 64.0)]
    assert points("val_accuracy") == [(0, 0.3), (1, 0.4)] and points("images_per_sec") == [(0, 60.5)]
    assert points("stopped_early") == [(0, 0.0)]
    assert client.get_run(run.run_id).data.metrics["val_accuracy"] == 0.4


def test_continue_run_without_train_output_is_a_clear_error(repo: Path) -> None:
    with (
        pytest.raises(tracking.TrackingError, match="dvc repro train"),
        tracking.continue_run(repo_params(), "models/run.json", "validate"),
    ):
        pass


def test_registry_champion_moves_only_when_better_and_challenger_is_the_newest_loser(
    repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    params = repo_params()
    _checkpoint(Path("models/best.pt"))
    with tracking.start_run(params, META, "cpu", "models/run.json"):
        pass
    client = MlflowClient()
    results, aliases = [], []
    with tracking.continue_run(params, "models/run.json", "register") as run:
        uri = tracking.log_model(run, "models/best.pt", _images())
        for acc in (0.50, 0.40, 0.50, 0.60, 0.1 + 0.2 + 0.25):  # the last is 0.55000000000000004
            metrics = {"test_accuracy": acc, "test_loss": 0.1 + 0.2, "test_num_images": 20}
            results.append(tracking.register_model(run, uri, "tiny", "test_accuracy", metrics))
            aliases.append({k: str(v) for k, v in client.get_registered_model("tiny").aliases.items()})
    assert [r["alias"] for r in results] == ["champion", "challenger", "challenger", "champion", "challenger"]
    assert [r["version"] for r in results] == [1, 2, 3, 4, 5]
    # The aliases after each registration: a tie keeps the earlier champion; a new champion leaves no
    # challenger (none is newer than it); the next loser is the challenger again.
    assert aliases == [
        {"champion": "1"},
        {"champion": "1", "challenger": "2"},
        {"champion": "1", "challenger": "3"},
        {"champion": "4"},
        {"champion": "4", "challenger": "5"},
    ]
    assert "does not beat champion v4's 0.6000" in results[-1]["reason"]
    assert "already exists" not in capfd.readouterr().err  # MLflow's note, printed on every registration
    v5 = client.get_model_version("tiny", "5")
    assert (v5.tags["test_accuracy"], v5.tags["test_loss"], v5.tags["test_num_images"]) == ("0.55", "0.3", "20")
    recipe = f"test-time augmentation {params.model.tta}."
    for needle in ("Recipe: resnet", recipe, "Data: ", "Test: test_accuracy 0.55, test_loss 0.3", f"({run.run_id})"):
        assert needle in v5.description, v5.description


def test_the_registered_model_is_named_after_its_run_and_its_figures_name_the_dataset(repo: Path) -> None:
    params = repo_params()
    _checkpoint(Path("models/best.pt"), tta="flip")
    with tracking.start_run(params, META, "cpu", "models/run.json"):
        pass
    figures = {"test_accuracy": 0.5, "test_loss": 1.25}
    with tracking.continue_run(params, "models/run.json", "evaluate") as run:
        run.log_results(figures)
    with tracking.continue_run(params, "models/run.json", "register") as run:
        result = tracking.register_checkpoint(
            run, "models/best.pt", _images(), "tiny", "test_accuracy", figures, meta=META
        )
    client = MlflowClient()
    version = client.get_model_version("tiny", str(result["version"]))
    model = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    run_name = mlflow.get_run(run.run_id).info.run_name
    assert model.name == "resnet20-" + run_name.replace(".", "_")
    # How the version predicts: the checkpoint's test-time augmentation, on the version and in the MLmodel.
    assert version.tags["tta"] == "flip"
    assert mlflow.models.get_model_info(version.source).metadata["tta"] == "flip"
    # The model's figures are the run's, measured on the prepared data of META...
    linked = {m.key: (m.value, m.dataset_name, m.dataset_digest) for m in model.metrics}
    name = "imagefolder from archive.tar.gz (train/val/test 9/3/3)"
    assert linked == {k: (v, name, META["content_sha256"][:32]) for k, v in figures.items()}
    # ... and the run still holds each of them once.
    for key in figures:
        assert len(client.get_metric_history(run.run_id, key)) == 1, key


@pytest.mark.parametrize(
    "code,raised",
    [
        ("RESOURCE_ALREADY_EXISTS", None),  # a second registration of the same name: fine
        ("PERMISSION_DENIED", "cannot create registered model 'tiny'.*PERMISSION_DENIED.*credentials"),
        ("TEMPORARILY_UNAVAILABLE", "cannot create registered model 'tiny'.*TEMPORARILY_UNAVAILABLE"),
    ],
)
def test_registration_tolerates_only_an_existing_model(
    repo: Path, monkeypatch: pytest.MonkeyPatch, code: str, raised: str | None
) -> None:
    """An authentication or connection error while creating the registered model stops the stage."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    params = repo_params()
    _checkpoint(Path("models/best.pt"))
    with tracking.start_run(params, META, "cpu", "models/run.json"):
        pass
    with tracking.continue_run(params, "models/run.json", "register") as run:
        uri = tracking.log_model(run, "models/best.pt", _images())
        MlflowClient().create_registered_model("tiny")

        def refuse(self: MlflowClient, name: str, *args: object, **kwargs: object) -> None:
            raise MlflowException(f"refused {name}", error_code=getattr(databricks_pb2, code))

        monkeypatch.setattr(MlflowClient, "create_registered_model", refuse)
        if raised is None:
            assert tracking.register_model(run, uri, "tiny", "test_accuracy", {"test_accuracy": 0.5})["version"] == 1
        else:
            with pytest.raises(tracking.TrackingError, match=raised):
                tracking.register_model(run, uri, "tiny", "test_accuracy", {"test_accuracy": 0.5})
            assert MlflowClient().search_model_versions("name='tiny'") == []


@pytest.mark.parametrize("tta", [None, "flip_translate"])
def test_pyfunc_model_loads_in_a_fresh_process_and_matches_the_network(repo: Path, tta: str | None) -> None:
    params = repo_params()
    model = _checkpoint(Path("models/best.pt"), tta=tta)
    images = _images(8)
    with tracking.start_run(params, META, "cpu", "models/run.json"):
        pass
    with tracking.continue_run(params, "models/run.json", "register") as run:
        uri = tracking.log_model(run, "models/best.pt", images)
        tracking.register_model(run, uri, "tiny", "test_accuracy", {"test_accuracy": 0.5})

    np.save("images.npy", images)
    script = (
        "import mlflow, numpy as np, json\n"
        f"mlflow.set_tracking_uri('sqlite:///{repo.resolve()}/mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/tiny@champion')\n"
        "out = m.predict(np.load('images.npy'))\n"
        "print(json.dumps({'labels': list(out['label']), 'probs': out.filter(like='prob_').values.tolist(),\n"
        "                  'confidence': list(out['confidence']), 'tta': m.metadata.metadata.get('tta')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        # The checkpoint's test-time augmentation, as the evaluate stage applies it (none when unset).
        expected = torch.softmax(tta_logits(model, x, tta or "none"), 1).numpy()
        plain = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(np.array(got["probs"]), expected, rtol=1e-4, atol=1e-5)
    if tta:  # not the plain network's answer
        assert not np.allclose(np.array(got["probs"]), plain, atol=1e-4)
    assert got["labels"] == [CLASSES[i] for i in expected.argmax(1)]
    assert got["tta"] == (tta or "none")
    # What the evaluate stage measures with the same TTA: the same confidences, so the same accuracy.
    labels = np.arange(len(images)) % len(CLASSES)
    loader = DeviceLoader(images, labels, 3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    measured = evaluate(model, loader, len(CLASSES), tta=tta or "none")
    np.testing.assert_allclose(got["confidence"], measured.confidences, rtol=1e-4, atol=1e-5)
    assert np.mean([CLASSES.index(c) for c in got["labels"]] == labels) == measured.accuracy

    # The inference command writes the top classes of each image file as CSV.
    Image.fromarray(images[0]).save("a.png")
    Image.fromarray(np.zeros((40, 24), dtype=np.uint8)).save("gray-and-larger.png")
    proc = subprocess.run(
        [sys.executable, "-m", "resnet.predict", "--model", "models:/tiny@champion", "--top-k", "2"]
        + ["a.png", "gray-and-larger.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.reader(proc.stdout.splitlines()))
    assert rows[0] == ["path", "label", "confidence", "top1_label", "top1_prob", "top2_label", "top2_prob"]
    assert rows[1][:2] == ["a.png", CLASSES[int(expected[0].argmax())]] and rows[2][0] == "gray-and-larger.png"
    assert "classified 2 images, skipped 0 -> standard output" in proc.stderr

    proc = subprocess.run(
        [sys.executable, "-m", "resnet.predict", "--model", "models:/nope@champion", "a.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "nope" in proc.stderr


# --------------------------------------------------------------------------- pyfunc: any size, 1 or 3 channels


def _image_folder_for_inference(root: Path) -> list[Path]:
    """train/<class>/ noise images, and test/cat/ a 64x64 RGB and a 40x24 grayscale file; returns the two.

    Noise, not smooth pictures: every resize and rounding difference shows in the pixels.
    """
    rng = np.random.default_rng(3)
    for cls in CLASSES:
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
    (root / "test" / "cat").mkdir(parents=True)
    files = [root / "test" / "cat" / "a-rgb.png", root / "test" / "cat" / "b-gray.png"]
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(files[0])
    Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8)).save(files[1])  # mode L
    return files


def _train_tiny(prepared: Path, meta: dict, channels: int) -> torch.nn.Module:
    """A resnet20 (width 0.25) after one SGD step on the prepared train split, in eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet20", len(CLASSES), channels, width_multiplier=0.25)
    x, y = load_split(prepared, "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in DeviceLoader(x, y, 4, mean=meta["mean"], std=meta["std"], train=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model.eval()


def _training_time_probs(model: torch.nn.Module, images: np.ndarray, meta: dict) -> np.ndarray:
    """Probabilities of split-stage pixels, normalised as in training, one image per batch."""
    probs = []
    with torch.inference_mode():
        for i in range(len(images)):
            ((x, _),) = DeviceLoader(
                images[i : i + 1], np.zeros(1, dtype=np.int64), 1, mean=meta["mean"], std=meta["std"]
            )
            probs.append(torch.softmax(model(x), dim=1).numpy()[0])
    return np.array(probs, dtype=np.float64)


@pytest.mark.parametrize("channels", [3, 1])
def test_pyfunc_takes_any_size_and_grayscale_exactly_as_training_does(repo: Path, channels: int) -> None:
    """A 64x64 RGB image and a grayscale one, 16x16 training images: the logged model, `resnet.predict`
    and the split stage + training normalisation give the same probabilities, bit for bit."""
    files = _image_folder_for_inference(repo / "folder")
    dparams = data_params(
        dataset="imagefolder", source=str(repo / "folder"), image_size=16, channels=channels, val_fraction=0.34
    )
    download(dparams, repo / "raw")
    meta = prepare(repo / "raw", repo / "prepared", dparams)
    split_pixels, _ = load_split(repo / "prepared", "test")  # the two test files, as training sees them
    assert split_pixels.shape == (2, 16, 16, channels)
    model = _train_tiny(repo / "prepared", meta, channels)
    expected = _training_time_probs(model, split_pixels, meta)
    save_checkpoint(
        Path("models/best.pt"),
        {
            "arch": {
                "name": "resnet20",
                "num_classes": len(CLASSES),
                "in_channels": channels,
                "options": {"width_multiplier": 0.25},
            },
            "model": model.state_dict(),
            "classes": meta["classes"],
            "mean": meta["mean"],
            "std": meta["std"],
            "image_size": meta["image_size"],
            "epoch": 1,
        },
    )
    params = repo_params()
    with tracking.start_run(params, META, "cpu", "models/run.json"):
        pass
    with tracking.continue_run(params, "models/run.json", "register") as run:
        uri = tracking.log_model(run, "models/best.pt", split_pixels)

    loaded = mlflow.pyfunc.load_model(uri)
    rgb = np.asarray(Image.open(files[0]))[None]  # (1, 64, 64, 3)
    gray = np.asarray(Image.open(files[1]))[None, ..., None]  # (1, 40, 24, 1)
    for i, images in enumerate((rgb, gray)):
        out = loaded.predict(images)
        np.testing.assert_array_equal(out.filter(like="prob_").to_numpy(), expected[i : i + 1])
        assert out["label"].tolist() == [CLASSES[int(expected[i].argmax())]]
    # resnet.predict reads the files and lets the model resize, then convert, as the split stage did.
    table = predict.predict_files(loaded, files)
    np.testing.assert_array_equal(table.filter(like="prob_").to_numpy(), expected)

    with pytest.raises(Exception, match=r"C = 1 \(grayscale\) or 3 \(RGB\).*\(1, 8, 8, 4\)"):
        loaded.predict(np.zeros((1, 8, 8, 4), dtype=np.uint8))  # RGBA: refused, naming the shape


# --------------------------------------------------------------------------- predict: untrusted images


def test_predict_refuses_a_decompression_bomb_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A PNG of 20000 x 20000 (50 KB): skipped in one warning line naming the file and the limit; with nothing
    else to classify, exit status 1 and one error line, no traceback."""
    from archives import png_bomb

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    monkeypatch.setattr(tracking, "load_pyfunc", lambda uri, params: None)  # never asked to predict
    argv = ["--model", "models:/m@champion", "--params", str(tmp_path / "none.yaml"), str(bomb)]
    assert predict.main(argv) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"skipped: cannot read image {bomb}: image (400,000,000 pixels)")
    assert "over the limit of 89,478,485 pixels" in warnings[0]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage() == "no image could be classified (1 skipped, see above)"
