"""Params for tests: the repository's params.yaml (the one source of the recipe) with changes.

The params dataclasses have no defaults of their own: every value comes from a
params.yaml. Tests start from the shipped one and change what they need, validated
exactly as a stage would validate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet.config import DataParams, Params, load_params, override

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "params.yaml"


def repo_params(changes: dict[str, Any] | None = None) -> Params:
    """params.yaml of the repository with dotted-key changes: ``repo_params({"train.lr": 0.05})``."""
    return override(load_params(PARAMS_FILE), changes or {})


def section_changes(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{"lr": 0.1}`` for section ``train`` -> ``{"train.lr": 0.1}``; nested mappings become dotted keys too."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(section_changes(f"{section}.{key}", value))
        else:
            out[f"{section}.{key}"] = value
    return out


def data_params(**values: Any) -> DataParams:
    """The repository's data section with some keys changed: ``data_params(dataset="imagefolder", source=...)``."""
    return repo_params(section_changes("data", values)).data
