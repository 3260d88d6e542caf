"""params.yaml validation: params.yaml is the one source of every value, and every mistake stops
with one message naming the key, before any work."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml
from paramsets import PARAMS_FILE, repo_params

from resnet.config import ConfigError, Params, load_params, override, parse_params, to_flat_dict
from resnet.utils import flatten

RAW = yaml.safe_load(PARAMS_FILE.read_text())


def _leaf_and_section_keys(obj: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else k
        keys.append(key)
        if isinstance(v, dict):
            keys += _leaf_and_section_keys(v, key)
    return keys


def _without(key: str) -> dict:
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    del node[leaf]
    return raw


def test_the_params_dataclasses_have_no_defaults_of_their_own() -> None:
    """The recipe lives in params.yaml only: no field can fall back to a value written in the code."""

    def fields(cls: type) -> list[dataclasses.Field]:
        out = []
        for f in dataclasses.fields(cls):
            out.append(f)
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                out += fields(f.type)
        return out

    with_default = [
        f.name
        for f in fields(Params)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []
    with pytest.raises(TypeError):
        Params()  # type: ignore[call-arg]


@pytest.mark.parametrize("key", _leaf_and_section_keys(RAW))
def test_every_key_of_params_yaml_is_required(key: str) -> None:
    """Deleting any key (or section) is an error naming it, not a silent change of recipe."""
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: missing from params.yaml")):
        parse_params(_without(key))


def test_repository_params_yaml_loads_value_for_value() -> None:
    params = load_params(PARAMS_FILE)
    flat_file, flat_params = flatten(RAW), to_flat_dict(params)
    assert flat_file.keys() == flat_params.keys()
    for key, value in flat_file.items():
        assert flat_params[key] == value, key


def _with(section: str, key: str, value: object) -> dict:
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw[section][key] = value
    return raw


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        ("train", "lr", "fast", "train.lr"),
        ("train", "lr", -0.1, "train.lr"),
        ("train", "epochs", 2.5, "train.epochs"),
        ("train", "optimizer", "lamb", "['sgd', 'adam', 'adamw']"),
        ("train", "nesterov", "yes", "train.nesterov"),
        ("train", "precision", "fp8", "train.precision"),
        ("train", "device", "tpu", "train.device"),
        ("model", "name", "resnet19", "model.name"),
        ("model", "shortcut", "C", "model.shortcut"),
        ("data", "val_fraction", 1.0, "data.val_fraction"),
        ("data", "val_fraction", 0, "data.val_fraction"),
        ("data", "channels", 2, "data.channels"),
        ("validate", "checkpoint", "middle", "validate.checkpoint"),
        ("register", "metric", "loss", "register.metric"),
    ],
)
def test_bad_value_names_the_key(section: str, key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(_with(section, key, value))
    assert needle in str(info.value)
    assert repr(value) in str(info.value) or needle.startswith("[")


def test_unknown_key_is_an_error_listing_valid_keys() -> None:
    raw = _with("train", "learning_rate", 0.1)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\] in section 'train'.*'lr'"):
        parse_params(raw)
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="trian"):
        parse_params(raw)


def test_nested_augment_section_is_validated() -> None:
    raw = _with("train", "augment", {"crop_padding": -1, "flip": True, "cutout": 0, "resized_crop_scale": 0})
    with pytest.raises(ConfigError, match=r"train\.augment\.crop_padding"):
        parse_params(raw)


def test_yaml_exponent_without_dot_is_read_as_a_number() -> None:
    # YAML 1.1 reads 5e-4 as a string; the config accepts it as the number it means.
    assert parse_params(_with("train", "weight_decay", "5e-4")).train.weight_decay == pytest.approx(5e-4)


# A one-stage custom network at full width (the default's x0.25 would narrow the layouts below).
CUSTOM = {
    "model.name": "custom",
    "model.width_multiplier": 1.0,
    "model.block": "basic",
    "model.layers": [2],
    "model.widths": [16],
}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"train.schedule": "multistep", "train.milestones": []}, r"^train\.milestones: \[\] must be"),
        ({"train.schedule": "multistep", "train.milestones": [3, 1000]}, r"^train\.milestones: \[3, 1000\]"),
        ({"train.schedule": "multistep", "train.milestones": [3, 3]}, r"^train\.milestones: \[3, 3\]"),
        ({"train.milestones": [5]}, r"^train\.milestones: \[5\] only applies to train\.schedule multistep"),
        (
            {"train.epochs": 15, "train.warmup_epochs": 15.0},
            r"^train\.warmup_epochs: 15\.0 must be below train\.epochs \(15\)",
        ),
        ({"model.freeze_backbone": True}, r"^model\.freeze_backbone: true needs model\.pretrained"),
        ({"model.pretrained": "no/such/checkpoint.pt"}, r"^model\.pretrained: 'no/such/checkpoint\.pt' is not a file"),
        ({"data.sha256": "abc"}, r"^data\.sha256: 'abc' is not a 64-character"),
        # Caught by build_model / the optimizer / the device before; now when params load.
        ({"model.stem": "imagenet", "model.name": "resnet20"}, r"^model\.stem: 'imagenet' does not apply to resnet20"),
        ({"model.stem": "imagenet"}, r"^model\.stem: 'imagenet' does not apply to resnet9; choose one of"),
        ({"model.stem": "cifar", "model.name": "resnet56", "model.width_multiplier": 1.0}, None),
        ({"train.momentum": 0.0}, r"^train\.nesterov: true needs train\.momentum > 0"),
        ({"train.momentum": 0.0, "train.optimizer": "adamw"}, None),
        (
            {"train.augment.resized_crop_scale": 0.35},
            r"^train\.augment\.resized_crop_scale: 0\.35 with train\.augment\.crop_padding: 2: two random crops",
        ),
        ({"train.augment.resized_crop_scale": 0.35, "train.augment.crop_padding": 0}, None),
        (
            {"model.width_multiplier": 0.25, "model.name": "resnet20"},
            r"^train\.channels_last: true on CPU cannot train this model: the 1x1 "
            r"stride-2 convolution layer2\.0\.downsample\.0 has 4 input channels",
        ),
        (
            {
                "model.width_multiplier": 0.25,
                "model.name": "resnet20",
                "train.channels_last": False,
                "train.compile": True,
            },
            r"^train\.compile: true on CPU",
        ),
        ({"model.width_multiplier": 0.25, "model.name": "resnet20", "model.shortcut": "A"}, None),
        # A custom network: its layout keys, and only with it.
        ({"model.layers": [2, 2]}, r"^model\.layers: only describes model\.name: custom \(it is 'resnet9'\)"),
        ({"model.name": "custom", "model.width_multiplier": 1.0}, r"^model: block=None is not valid"),
        (
            {"model.name": "custom", "model.block": "basic", "model.layers": [2, 2], "model.widths": [16]},
            r"^model: layers \[2, 2\] and widths \[16\] must have one entry per stage",
        ),
        (
            {**CUSTOM, "model.layers": [2, 2], "model.widths": [16, 32]},
            None,
        ),
        (
            {**CUSTOM, "model.stem": "whiten"},
            r"^model\.stem: 'whiten' does not apply to custom; choose one of \['cifar', 'imagenet'\]",
        ),
        (
            {**CUSTOM, "model.layers": [1, 1], "model.widths": [4, 8]},
            r"^train\.channels_last: true on CPU cannot train this model: the 1x1 stride-2 convolution layer2",
        ),
    ],
)
def test_cross_field_rules(changes: dict, message: str | None) -> None:
    if torch.cuda.is_available() and "layer2" in (message or "") + str(changes):
        pytest.skip("the NHWC rule is for CPU training; this machine has a GPU")
    base = load_params(PARAMS_FILE)
    if message is None:
        override(base, changes)
        return
    with pytest.raises(ConfigError, match=message):
        override(base, changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_when_params_load() -> None:
    with pytest.raises(ConfigError, match=r"^train\.device: 'cuda' but no CUDA GPU is available"):
        repo_params({"train.device": "cuda"})


def test_missing_empty_or_broken_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("")
    with pytest.raises(ConfigError, match="params.yaml is empty"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2, column 1: .*; fix the syntax") as info:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(tmp_path / "params.yaml")


def test_override_changes_dotted_keys_and_validates() -> None:
    params = repo_params({"train.lr": 0.05, "train.augment.cutout": 8})
    assert params.train.lr == 0.05 and params.train.augment.cutout == 8
    with pytest.raises(ConfigError, match=r"train\.lrr: no such key"):
        repo_params({"train.lrr": 0.05})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        repo_params({"train.lr": -1})


def test_flat_dict_is_what_mlflow_logs() -> None:
    flat = to_flat_dict(load_params(PARAMS_FILE))
    assert flat["train.lr"] == RAW["train"]["lr"] and flat["train.augment.flip"] == RAW["train"]["augment"]["flip"]
    assert flat["model.name"] == RAW["model"]["name"]
