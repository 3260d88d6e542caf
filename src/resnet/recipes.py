"""Named recipes: ``recipes/<name>.yaml``, each a set of params.yaml overrides, run by ``make repro RECIPE=<name>``.

A recipe file maps dotted keys to values (``train.lr: 0.2``), exactly what ``dvc exp run
-S`` takes; ``make repro RECIPE=<name>`` runs the pipeline as a DVC experiment with them
(they are written to params.yaml, as ``-S`` always does, so MLflow and ``dvc exp show``
record them like any other run). Every recipe is checked against params.yaml's rules
before DVC starts: a bad key or value stops with the line params.yaml would give.

    python -m resnet.recipes                 # the recipes, one line each
    python -m resnet.recipes cpu-resnet20    # its dvc exp run arguments: -S key=value ...
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from resnet.config import ConfigError, load_params, override
from resnet.utils import repo_root

__all__ = ["RECIPES_DIR", "list_recipes", "load_recipe", "dvc_set_args"]

RECIPES_DIR = Path("recipes")


def _dir(root: Path | None) -> Path:
    return (root or repo_root()) / RECIPES_DIR


def list_recipes(root: Path | None = None) -> list[str]:
    """The names of the recipe files in ``<root>/recipes`` (the repository's by default)."""
    return sorted(p.stem for p in _dir(root).glob("*.yaml"))


def load_recipe(name: str, root: Path | None = None) -> dict[str, Any]:
    """The overrides of recipe ``name``, checked against ``<root>/params.yaml``'s rules (ConfigError if bad)."""
    path = _dir(root) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {name!r}: no {path}; choose one of {list_recipes(root)}")
    try:
        overrides = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {name!r}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and "." in k for k in overrides):
        raise ConfigError(f"recipe {name!r}: {path} must map dotted params keys to values (train.lr: 0.2)")
    try:
        override(load_params((root or repo_root()) / "params.yaml"), overrides)
    except ConfigError as e:
        raise ConfigError(f"recipe {name!r} ({path}): {e}") from None
    return overrides


def dvc_set_args(overrides: dict[str, Any]) -> list[str]:
    """``dvc exp run`` arguments setting these overrides: ["-S", "train.lr=0.2", ...] (values as YAML)."""
    args = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").strip()  # a bare scalar is dumped as a document: "0.2\n..."
        args += ["-S", f"{key}={text}"]
    return args


def main(argv: list[str] | None = None) -> int:
    """List the recipes, or print one's ``dvc exp run`` arguments (shell-quoted) for the Makefile."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("\n".join(list_recipes()))
        return 0
    try:
        print(shlex.join(dvc_set_args(load_recipe(argv[0]))))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
