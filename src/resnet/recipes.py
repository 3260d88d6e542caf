"""Named recipes: ``recipes/<name>.yaml``, each a set of params.yaml overrides, run by ``make repro RECIPE=<name>``.

A recipe file maps dotted keys to values (``train.lr: 0.2``), exactly what ``dvc exp run
-S`` takes; ``make repro RECIPE=<name>`` runs the pipeline as a DVC experiment with them
(they are written to params.yaml, as ``-S`` always does, so MLflow and ``dvc exp show``
record them like any other run). Every recipe is checked against params.yaml's rules
before DVC starts: a bad key or value stops with the line params.yaml would give.

    python -m resnet.recipes                 # the recipes, one line each
    python -m resnet.recipes cpu-resnet20    # its dvc exp run arguments: -S key=value ...
    python -m resnet.recipes tutorial-finetune model.pretrained=r18.pth   # plus your own values

A recipe that needs a value only its user has (a weights file) names it under
``recipe.requires``; it is refused until that key is given (``make repro RECIPE=<name>
SET="key=value ..."``). The recipes shipped here state every key of :data:`PINNED_KEYS`,
so each means the same whatever params.yaml (or the last experiment) left behind.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from resnet.config import ConfigError, load_params, override
from resnet.utils import repo_root

__all__ = [
    "RECIPES_DIR",
    "PINNED_KEYS",
    "REQUIRES",
    "list_recipes",
    "required_keys",
    "load_recipe",
    "parse_sets",
    "dvc_set_args",
]

RECIPES_DIR = Path("recipes")
#: A recipe's own key: the params its user must give (SET=), e.g. [model.pretrained].
REQUIRES = "recipe.requires"
#: What a shipped recipe states in full: the data shape, the network, and every training knob
#: that changes the result (not where the data comes from, the device or the thread count).
PINNED_KEYS = (
    *("data.image_size", "data.val_fraction"),
    *(f"model.{k}" for k in ("name", "stem", "shortcut", "width_multiplier", "zero_init_residual")),
    *(f"model.{k}" for k in ("pretrained", "freeze_backbone", "tta", "block", "layers", "widths")),
    *(f"train.{k}" for k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov")),
    *(f"train.{k}" for k in ("weight_decay", "no_decay_norm_bias", "norm_bias_lr_scale", "schedule")),
    *(f"train.{k}" for k in ("milestones", "gamma", "warmup_epochs", "label_smoothing", "precision")),
    *("train.eval_every", "train.augment.crop_padding", "train.augment.flip", "train.augment.cutout"),
    *("train.augment.resized_crop_scale", "train.ema.decay"),
)


def _dir(root: Path | None) -> Path:
    return (root or repo_root()) / RECIPES_DIR


def list_recipes(root: Path | None = None) -> list[str]:
    """The names of the recipe files in ``<root>/recipes`` (the repository's by default)."""
    return sorted(p.stem for p in _dir(root).glob("*.yaml"))


def required_keys(name: str, root: Path | None = None) -> list[str]:
    """The keys recipe ``name`` needs its user to give (its ``recipe.requires``); [] for most."""
    path = _dir(root) / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    return list(raw.get(REQUIRES, [])) if isinstance(raw, dict) else []


def load_recipe(name: str, root: Path | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides of recipe ``name`` with ``extra`` over them, checked against ``<root>/params.yaml``'s rules.

    Raises ConfigError naming the recipe and the key: a bad key or value, or a key the
    recipe requires (``recipe.requires``) that ``extra`` does not give.
    """
    path = _dir(root) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {name!r}: no {path}; choose one of {list_recipes(root)}")
    try:
        overrides = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {name!r}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and "." in k for k in overrides):
        raise ConfigError(f"recipe {name!r}: {path} must map dotted params keys to values (train.lr: 0.2)")
    required = overrides.pop(REQUIRES, [])
    missing = [k for k in required if k not in (extra or {})]
    if missing:
        raise ConfigError(
            f"recipe {name!r} needs {missing[0]}, which only you can give (see {path}): "
            f'make repro RECIPE={name} SET="{missing[0]}=..."'
        )
    overrides = {**overrides, **(extra or {})}
    try:
        override(load_params((root or repo_root()) / "params.yaml"), overrides)
    except ConfigError as e:
        raise ConfigError(f"recipe {name!r} ({path}): {e}") from None
    return overrides


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["model.pretrained=r18.pth", "train.epochs=3"]`` as overrides, each value read as YAML (as DVC's -S)."""
    sets = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"{item!r} is not key=value with a dotted params key (model.pretrained=r18.pth)")
        sets[key] = yaml.safe_load(text) if text else None
    return sets


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
        print(shlex.join(dvc_set_args(load_recipe(argv[0], extra=parse_sets(argv[1:])))))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
