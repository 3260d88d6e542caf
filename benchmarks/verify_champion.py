"""Check the registered champion against metrics/test.json, outside the pipeline.

Decodes the test images straight from the image-folder archive with PIL (not with
the pipeline's reader), loads ``models:/<name>@champion`` with plain
``mlflow.pyfunc.load_model`` in this process, and compares its accuracy with the
``test_accuracy`` the evaluate stage wrote. Run from the repository root after the
pipeline:

    python benchmarks/verify_champion.py --archive ../shared/datasets/cifar10-jpeg.tar.gz

Prints both accuracies and their difference, and writes
benchmarks/results/verify-champion-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import mlflow
import numpy as np
import yaml
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def read_test_split(archive: Path) -> tuple[np.ndarray, list[str]]:
    """All <root>/test/<class>/<image> members, decoded with PIL to RGB uint8; labels as class names."""
    images, labels = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "test":
                continue
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(parts[-2])
    return np.stack(images), labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="image-folder archive with a test/ split")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()

    name = yaml.safe_load(Path("params.yaml").read_text())["register"]["model_name"]
    expected = json.loads(Path("metrics/test.json").read_text())["test_accuracy"]

    t0 = time.perf_counter()
    images, labels = read_test_split(args.archive)
    mlflow.set_tracking_uri(args.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predicted = model.predict(images)["label"].tolist()
    accuracy = float(np.mean([p == t for p, t in zip(predicted, labels)]))
    result = {
        "date": dt.date.today().isoformat(),
        "model": f"models:/{name}@champion",
        "archive": str(args.archive),
        "num_images": len(labels),
        "pyfunc_accuracy": accuracy,
        "metrics_test_accuracy": expected,
        "difference_points": round(100 * (accuracy - expected), 3),
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"verify-champion-{result['date']}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if abs(result["difference_points"]) <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
