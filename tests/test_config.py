"""params.yaml validation: every mistake stops with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from resnet.config import ConfigError, Params, load_params, parse_params, to_flat_dict

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid_and_complete() -> None:
    """The shipped params.yaml names every key explicitly (no hidden defaults)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    flat_defaults = to_flat_dict(Params())
    flat_file = to_flat_dict(params)
    assert flat_file.keys() == flat_defaults.keys()
    for section, values in raw.items():
        for key in values:
            assert f"{section}.{key}" in flat_file or any(k.startswith(f"{section}.{key}.") for k in flat_file)


def _with(section: str, key: str, value: object) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section][key] = value
    return raw


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        ("train", "lr", "fast", "train.lr"),
        ("train", "lr", -0.1, "train.lr"),
        ("train", "epochs", 2.5, "train.epochs"),
        ("train", "optimizer", "adam", "['sgd', 'adamw']"),
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
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="trian"):
        parse_params(raw)


def test_nested_augment_section_is_validated() -> None:
    raw = _with("train", "augment", {"crop_padding": -1})
    with pytest.raises(ConfigError, match=r"train\.augment\.crop_padding"):
        parse_params(raw)


def test_yaml_exponent_without_dot_is_read_as_a_number() -> None:
    # YAML 1.1 reads 5e-4 as a string; the config accepts it as the number it means.
    assert parse_params(_with("train", "weight_decay", "5e-4")).train.weight_decay == pytest.approx(5e-4)


def test_cross_field_rules() -> None:
    raw = _with("train", "schedule", "multistep")
    raw["train"]["milestones"] = []
    with pytest.raises(ConfigError, match="train.milestones"):
        parse_params(raw)
    raw["train"]["milestones"] = [3, 1000]
    with pytest.raises(ConfigError, match="train.milestones"):
        parse_params(raw)
    with pytest.raises(ConfigError, match="model.freeze_backbone"):
        parse_params(_with("model", "freeze_backbone", True))
    with pytest.raises(ConfigError, match="data.sha256"):
        parse_params(_with("data", "sha256", "abc"))


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_flat_dict_is_what_mlflow_logs() -> None:
    flat = to_flat_dict(Params())
    assert flat["train.lr"] == 0.1 and flat["train.augment.flip"] is True and flat["model.name"] == "resnet20"
