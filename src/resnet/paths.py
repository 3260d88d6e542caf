"""The files the pipeline's stages hand each other: each named once, here.

Paths are relative to the repository root, where DVC runs every stage. dvc.yaml
lists the same paths (deps, outs, metrics, plots); tests/test_pipeline_files.py
checks that dvc.yaml and :data:`STAGE_INPUTS` / :data:`STAGE_OUTPUTS` agree, so the
pipeline, the code and docs/architecture.md cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")

# download -> split
RAW = Path("data/raw")
SOURCE_RECORD = RAW / "source.json"  # what was downloaded, its checksum and the file's name in RAW

# split -> train, validate, evaluate, register
PREPARED = Path("data/prepared")
META = PREPARED / "meta.json"

# train -> validate, evaluate, register
MODELS = Path("models")
BEST_CHECKPOINT = MODELS / "best.pt"
LAST_CHECKPOINT = MODELS / "last.pt"
RUN_FILE = MODELS / "run.json"  # the pipeline's MLflow run, continued by the later stages
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("plots/train/history.csv")

#: What ``validate.checkpoint`` / ``evaluate.checkpoint`` (best | last) point at.
CHECKPOINTS: dict[str, Path] = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}

# validate
VAL_METRICS = Path("metrics/val.json")
VAL_CONFUSION = Path("plots/val/confusion.csv")
VAL_PER_CLASS = Path("plots/val/per_class.csv")

# evaluate -> register
TEST_METRICS = Path("metrics/test.json")
TEST_CONFUSION = Path("plots/test/confusion.csv")
TEST_PER_CLASS = Path("plots/test/per_class.csv")
TEST_CONFUSION_PNG = Path("plots/test/confusion.png")
TEST_MISCLASSIFIED_PNG = Path("plots/test/misclassified.png")

# register
REGISTER_RESULT = Path("metrics/register.json")
ONNX_MODEL = MODELS / "model.onnx"  # the registered checkpoint exported for onnxruntime (resnet.export)

_TRAINED = [BEST_CHECKPOINT, LAST_CHECKPOINT, RUN_FILE]

#: The data files each stage reads (besides its code and params), as dvc.yaml's deps name them.
STAGE_INPUTS: dict[str, list[Path]] = {
    "download": [],
    "split": [RAW],
    "train": [PREPARED],
    "validate": [*_TRAINED, PREPARED],
    "evaluate": [*_TRAINED, PREPARED],
    "register": [*_TRAINED, TEST_METRICS, PREPARED],
}

#: The files each stage writes, as dvc.yaml's outs, metrics and plots name them.
STAGE_OUTPUTS: dict[str, list[Path]] = {
    "download": [RAW],
    "split": [PREPARED],
    "train": [*_TRAINED, TRAIN_METRICS, TRAIN_HISTORY],
    "validate": [VAL_METRICS, VAL_CONFUSION, VAL_PER_CLASS],
    "evaluate": [TEST_METRICS, TEST_CONFUSION, TEST_PER_CLASS, TEST_CONFUSION_PNG, TEST_MISCLASSIFIED_PNG],
    "register": [ONNX_MODEL, REGISTER_RESULT],
}
