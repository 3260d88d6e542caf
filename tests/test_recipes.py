"""Named recipes (recipes/*.yaml, resnet.recipes, make repro RECIPE=...): valid, complete, passed to DVC intact,
and every one run through ``make repro RECIPE=<name>`` on tiny data (slow)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from paramsets import PARAMS_FILE, REPO
from test_experiments import DVC, commit_all, new_pipeline_repo, sh, tiny_params

from resnet.config import ConfigError, load_params, override, parse_params
from resnet.recipes import (
    PINNED_KEYS,
    REQUIRES,
    dvc_set_args,
    list_recipes,
    load_recipe,
    parse_sets,
    required_keys,
)
from resnet.tracking.runs import param_values

TUTORIALS = [
    "tutorial-resnet34-224",
    "tutorial-resnet18-cosine",
    "tutorial-resnet50-cosine",
    "tutorial-finetune",
    "tutorial-finetune-unfreeze",
    "tutorial-smallresnet",
    "tutorial-custom-2stage",
]


def recipe_file(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())


@pytest.fixture()
def torchvision_weights(tmp_path: Path) -> Path:
    """A torchvision ResNet-18 state dict on disk, as a user who downloaded the ImageNet weights has one."""
    import torch
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_the_shipped_recipes_are_listed_and_valid(torchvision_weights: Path) -> None:
    names = list_recipes(REPO)
    assert {"cpu-resnet9", "cpu-resnet20", "gpu-resnet18", *TUTORIALS} <= set(names)
    for name in names:
        given = {k: str(torchvision_weights) for k in required_keys(name, REPO)}
        assert load_recipe(name, REPO, given)  # raises ConfigError naming the recipe and key otherwise


@pytest.mark.parametrize("name", list_recipes(REPO))
def test_a_shipped_recipe_states_every_pinned_key(name: str) -> None:
    """Whatever params.yaml (or the last experiment) holds, the recipe trains the same network the same way."""
    missing = [k for k in PINNED_KEYS if k not in recipe_file(name)]
    assert not missing, f"recipes/{name}.yaml leaves {missing} to params.yaml"


def test_a_recipe_that_needs_your_weights_is_refused_until_given(torchvision_weights: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipe 'tutorial-finetune' needs model\.pretrained, which only you can"):
        load_recipe("tutorial-finetune", REPO)
    given = load_recipe("tutorial-finetune", REPO, {"model.pretrained": str(torchvision_weights)})
    assert given["model.pretrained"] == str(torchvision_weights) and REQUIRES not in given
    assert given["model.freeze_backbone"] is True and given["train.optimizer"] == "adam"
    with pytest.raises(ConfigError, match=r"model\.pretrained: 'nowhere\.pth' is not a file"):
        load_recipe("tutorial-finetune", REPO, {"model.pretrained": "nowhere.pth"})


def test_set_values_are_read_as_dvc_reads_them() -> None:
    sets = parse_sets(["model.pretrained=r18.pth", "train.epochs=3", "model.layers=[2, 2]", "model.stem="])
    assert sets == {"model.pretrained": "r18.pth", "train.epochs": 3, "model.layers": [2, 2], "model.stem": None}
    with pytest.raises(ConfigError, match=r"'epochs=3' is not key=value with a dotted params key"):
        parse_sets(["epochs=3"])


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
    given = subprocess.run([*run, "tutorial-finetune", "model.pretrained=w.pth"], cwd=REPO, capture_output=True)
    assert given.returncode == 1 and b"model.pretrained: 'w.pth' is not a file" in given.stderr


# --------------------------------------------------------------------------- every recipe, through make repro


def smoke_sets(name: str) -> dict:
    """What shrinks recipe ``name`` to a smoke run on the tiny data: one epoch, batches of 9, 32 px at most."""
    recipe = recipe_file(name)
    sets = {"train.epochs": 1, "train.batch_size": 9, "data.val_fraction": 0.25}
    if recipe["data.image_size"]:
        sets["data.image_size"] = 32
    if recipe["train.warmup_epochs"]:
        sets["train.warmup_epochs"] = 0
    if recipe["train.milestones"]:
        sets["train.milestones"] = [1]
    return sets


@dataclass
class RecipeRepo:
    path: Path
    base: dict  # its params.yaml before any recipe ran


@pytest.fixture(scope="module")
def recipe_repo(tmp_path_factory: pytest.TempPathFactory) -> RecipeRepo:
    """The project's pipeline, Makefile and recipes in a new git repository on tiny data; the venv is this one."""
    if shutil.which("git") is None or not Path(DVC).exists() or shutil.which("make") is None:
        pytest.skip("needs git, dvc and make")
    base = tiny_params()
    tmp = tmp_path_factory.mktemp("recipes")
    repo = new_pipeline_repo(tmp, base)
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    shutil.copytree(REPO / "recipes", repo / "recipes")
    (tmp / "venv").symlink_to(sys.prefix)  # the Makefile's venv (VENV=../venv): the one running these tests
    commit_all(repo, "pipeline with tiny params and the recipes")
    return RecipeRepo(repo, base)


def make_repro(repo: Path, name: str, sets: dict) -> subprocess.CompletedProcess:
    """``make repro RECIPE=name SET=...`` as a user types it, with this venv (make -o: it counts as installed)."""
    set_arg = " ".join(arg for arg in dvc_set_args(sets) if arg != "-S")
    cmd = ["make", "VENV=../venv", "-o", "../venv/.installed", "repro", f"RECIPE={name}", f"SET={set_arg}"]
    return sh(repo, *cmd, timeout=900)


def assert_ran_as_the_recipe(repo: RecipeRepo, name: str, sets: dict) -> None:
    """metrics/test.json written, and the newest MLflow run carries the recipe's values (smoke sizes over them)."""
    recipe = {k: v for k, v in recipe_file(name).items() if k != REQUIRES}
    with contextlib.chdir(repo.path):  # model.pretrained is a path from the repository's root
        expected = override(parse_params(repo.base), {**recipe, **sets})
    assert 0 <= json.loads((repo.path / "metrics" / "test.json").read_text())["test_accuracy"] <= 1
    client = MlflowClient(f"sqlite:///{repo.path}/mlflow.db")
    experiment = client.get_experiment_by_name(repo.base["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    logged = runs[0].data.params
    want = param_values(expected)
    assert {k: logged[k] for k in recipe} == {k: want[k] for k in recipe}
    assert runs[0].data.tags["model"] == expected.model.label
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_recipes(REPO) if not required_keys(n, REPO)])
def test_make_repro_runs_every_recipe(recipe_repo: RecipeRepo, name: str) -> None:
    sets = smoke_sets(name)
    make_repro(recipe_repo.path, name, sets)
    assert_ran_as_the_recipe(recipe_repo, name, sets)


@pytest.mark.slow
def test_make_repro_runs_the_two_fine_tuning_phases(recipe_repo: RecipeRepo) -> None:
    """Phase 1 from a torchvision state dict (backbone frozen), phase 2 from phase 1's checkpoint (all trained)."""
    import torch
    import torchvision

    repo = recipe_repo.path
    torchvision_state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(torchvision_state, repo / "resnet18.pth")
    sets = {**smoke_sets("tutorial-finetune"), "model.pretrained": "resnet18.pth"}
    make_repro(repo, "tutorial-finetune", sets)
    assert_ran_as_the_recipe(recipe_repo, "tutorial-finetune", sets)
    phase1 = torch.load(repo / "models" / "best.pt", weights_only=True)["model"]
    assert torch.equal(phase1["layer1.0.conv1.weight"], torchvision_state["layer1.0.conv1.weight"])  # frozen
    assert phase1["fc.weight"].shape[0] == len(
        json.loads((repo / "data" / "prepared" / "meta.json").read_text())["classes"]
    )
    shutil.copy(repo / "models" / "best.pt", repo / "finetune-phase1.pt")
    sets = {**smoke_sets("tutorial-finetune-unfreeze"), "model.pretrained": "finetune-phase1.pt"}
    make_repro(repo, "tutorial-finetune-unfreeze", sets)
    assert_ran_as_the_recipe(recipe_repo, "tutorial-finetune-unfreeze", sets)
    phase2 = torch.load(repo / "models" / "best.pt", weights_only=True)["model"]
    # Phase 1 trained the head only; phase 2 moved the backbone too.
    assert not torch.equal(phase1["layer1.0.conv1.weight"], phase2["layer1.0.conv1.weight"])
