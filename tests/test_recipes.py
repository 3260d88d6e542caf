"""Named recipes (recipes/*.yaml, resnet.recipes, make repro RECIPE=...): valid, and passed to DVC intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from paramsets import PARAMS_FILE, REPO

from resnet.config import ConfigError, load_params, override
from resnet.recipes import dvc_set_args, list_recipes, load_recipe


def test_the_shipped_recipes_are_listed_and_valid() -> None:
    names = list_recipes(REPO)
    assert {"cpu-resnet9", "cpu-resnet20", "gpu-resnet18"} <= set(names)
    for name in names:
        assert load_recipe(name, REPO)  # raises ConfigError naming the recipe and key otherwise


def test_the_cpu_default_recipe_is_params_yaml_as_committed() -> None:
    params = load_params(PARAMS_FILE)
    assert override(params, load_recipe("cpu-resnet9", REPO)) == params


def test_set_args_carry_every_value_as_dvc_reads_it() -> None:
    overrides = {"train.lr": 0.2, "model.stem": None, "train.augment.flip": "alternate", "train.milestones": [3, 5]}
    args = dvc_set_args(overrides)
    assert args[::2] == ["-S"] * 4
    # dvc exp run -S parses each value as YAML: the round trip gives the same values back.
    parsed = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[1::2])}
    assert parsed == overrides


def test_bad_recipes_are_refused_naming_the_recipe_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "params.yaml").write_text(PARAMS_FILE.read_text())
    (tmp_path / "recipes" / "typo.yaml").write_text("train.lrr: 0.1\n")
    (tmp_path / "recipes" / "flat.yaml").write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"recipe 'typo' .*train\.lrr: no such key"):
        load_recipe("typo", tmp_path)
    with pytest.raises(ConfigError, match="must map dotted params keys"):
        load_recipe("flat", tmp_path)
    with pytest.raises(ConfigError, match=r"recipe 'nope': no .*; choose one of \['flat', 'typo'\]"):
        load_recipe("nope", tmp_path)


def test_the_command_prints_arguments_or_one_error_line() -> None:
    run = [sys.executable, "-m", "resnet.recipes"]
    ok = subprocess.run([*run, "cpu-resnet20"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "-S model.name=resnet20" in ok.stdout and "-S train.epochs=15" in ok.stdout
    bad = subprocess.run([*run, "nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: recipe 'nope'") and not bad.stdout
    dry = subprocess.run(["make", "-n", "repro", "RECIPE=cpu-resnet20"], cwd=REPO, capture_output=True, text=True)
    assert "python -m resnet.recipes cpu-resnet20" in dry.stdout and "dvc exp run $args" in dry.stdout
