"""libs.config: YAML → validated dataclasses, errors naming file and key, overrides, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from libs.config import ConfigError, check_range, dump_yaml, load_config, override, to_dict


@dataclass
class Model:
    channels: int
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    attention: bool = True
    dropout: float = 0.0


@dataclass
class Train:
    lr: float = 1e-2
    objective: Literal["edm", "flow"] = "edm"
    betas: tuple[float, float] = (0.9, 0.99)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"ct": 1.0, "pet": 1.0})
    resume: Optional[str] = None  # noqa: UP045 -- typing.Optional must keep working
    out_dir: Path = Path("runs")
    tags: list[str] = field(default_factory=list)
    ema_stds: tuple[float, ...] = (0.05, 0.1)

    def __post_init__(self) -> None:
        check_range("lr", self.lr, low=0.0, low_inclusive=False)


@dataclass
class Experiment:
    model: Model
    train: Train = field(default_factory=Train)
    name: str = "demo"
    seed: int | None = None
    teacher: Model | None = None


def write(tmp_path: Path, data: dict, name: str = "lowres_demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def error_of(source, cls=Experiment) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, cls)
    message = str(info.value)
    assert "\n" not in message, f"error should be one line, got {message!r}"
    return message


def test_loads_nested_and_converts(tmp_path):
    path = write(tmp_path, {"model": {"channels": 32, "dropout": 1},
                            "train": {"lr": "1e-3", "betas": [0.9, 0.999], "out_dir": "x/y",
                                      "loss_weights": {"ct": 2, "pet": 0.5}, "ema_stds": [0.05]}})
    cfg = load_config(path, Experiment)
    assert cfg.model == Model(channels=32, dropout=1.0)
    assert isinstance(cfg.model.dropout, float), "int accepted for a float field and converted"
    assert cfg.train.lr == pytest.approx(1e-3), "YAML 1.1 reads '1e-3' as a string; float fields accept it"
    assert cfg.train.betas == (0.9, 0.999) and isinstance(cfg.train.betas, tuple)
    assert cfg.train.out_dir == Path("x/y")
    assert cfg.train.loss_weights == {"ct": 2.0, "pet": 0.5}
    assert cfg.train.ema_stds == (0.05,)
    assert cfg.seed is None and cfg.name == "demo"


def test_unknown_key_suggests_close_match_and_names_file(tmp_path):
    path = write(tmp_path, {"model": {"channels": 8, "chanel_mult": [1, 2]}})
    assert error_of(path) == (f"{path}: unknown key 'model.chanel_mult' (did you mean 'channel_mult'?)")


def test_unknown_top_level_key_lists_known_keys():
    message = error_of({"model": {"channels": 8}, "zzz": 1})
    assert "unknown key 'zzz'" in message and "known keys: model, train, name, seed, teacher" in message


def test_nested_unknown_key_has_full_dotted_path():
    message = error_of({"model": {"channels": 8}, "train": {"los_weights": {"ct": 1.0}}})
    assert "unknown key 'train.los_weights'" in message and "did you mean 'loss_weights'" in message


def test_optional_section_keeps_inner_key_path():
    message = error_of({"model": {"channels": 8}, "teacher": {"chanels": 4}})
    assert message == "config: unknown key 'teacher.chanels' (did you mean 'channels'?)"
    cfg = load_config({"model": {"channels": 8}, "teacher": {"channels": 4}}, Experiment)
    assert cfg.teacher == Model(channels=4)


def test_missing_required_key():
    assert error_of({"train": {}}) == "config: missing required key 'model'"
    assert error_of({"model": {"dropout": 0.1}}) == "config: missing required key 'model.channels'"


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("model", "channels", "abc", "expects int, got 'abc' (str)"),
    ("model", "channels", 8.0, "expects int, got 8.0 (float)"),
    ("model", "channels", True, "expects int, got True (bool)"),
    ("model", "attention", 1, "expects bool, got 1 (int)"),
    ("model", "dropout", "high", "expects float, got 'high' (str)"),
    ("model", "channel_mult", [1, "2"], "key 'model.channel_mult[1]' expects int, got '2' (str)"),
    ("model", "channel_mult", 4, "expects list[int], got 4 (int)"),
    ("train", "tags", ["a", 3], "key 'train.tags[1]' expects str, got 3 (int)"),
    ("train", "betas", [0.9], "expects 2 items"),
    ("train", "loss_weights", {"ct": "x"}, "key 'train.loss_weights.ct' expects float"),
    ("train", "resume", 5, "expects str | None, got 5 (int)"),
])
def test_wrong_types_name_key_type_and_value(section, key, value, expected):
    data = {"model": {"channels": 8}}
    data.setdefault(section, {})[key] = value
    message = error_of(data)
    assert f"'{section}.{key}" in message and expected in message, message


def test_bad_literal_lists_choices_and_suggests():
    message = error_of({"model": {"channels": 8}, "train": {"objective": "flw"}})
    assert message == ("config: key 'train.objective' expects one of 'edm', 'flow'; got 'flw' (str) "
                       "(did you mean 'flow'?)")


def test_post_init_range_check_becomes_config_error(tmp_path):
    path = write(tmp_path, {"model": {"channels": 8}, "train": {"lr": -1.0}})
    assert error_of(path) == f"{path}: train: lr must be > 0.0, got -1.0"


def test_check_range_message_states_both_bounds():
    with pytest.raises(ValueError, match=r"^p must be >= 0 and < 1, got 1.0$"):
        check_range("p", 1.0, low=0, high=1, high_inclusive=False)
    check_range("p", 0.0, low=0, high=1, high_inclusive=False)


@pytest.mark.parametrize("key, value", [("optim.lr_ref", ".nan"), ("height_law.a", ".nan"),
                                        ("height_law.b", ".inf"), ("height_law.slice_mm", "0")])
def test_non_finite_and_zero_values_are_refused_by_the_presets(key, value):
    from libs.lowres import LowresConfig
    cfg = load_config(Path(__file__).resolve().parents[1] / "1_Trainings/configs/lowres_demo.yaml", LowresConfig)
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        override(cfg, [f"{key}={value}"])


def test_file_errors_name_the_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml").endswith("nope.yaml: config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n", encoding="utf-8")
    assert error_of(bad).startswith(f"{bad}: invalid YAML")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n", encoding="utf-8")
    assert "expected a mapping" in error_of(scalar)


def test_yaml_round_trip_is_equal(tmp_path):
    cfg = load_config({"model": {"channels": 16, "channel_mult": [1, 2]}, "seed": 3,
                       "teacher": {"channels": 2},
                       "train": {"tags": ["a"], "resume": "r.pt", "lr": 2.5e-7}}, Experiment)
    text = dump_yaml(cfg)
    assert load_config(yaml.safe_load(text), Experiment) == cfg
    path = tmp_path / "again.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path, Experiment) == cfg
    plain = to_dict(cfg)
    assert plain["train"]["betas"] == [0.9, 0.99] and plain["train"]["out_dir"] == "runs"


def test_override_parses_values_as_yaml_and_validates():
    cfg = load_config({"model": {"channels": 8}}, Experiment)
    new = override(cfg, ["model.channels=32", "train.lr=1e-3", "model.channel_mult=[1, 1]",
                         "train.resume=null", "train.loss_weights.ct=3", "seed=7", "name=run a"])
    assert new.model.channels == 32 and new.model.channel_mult == [1, 1]
    assert new.train.lr == pytest.approx(1e-3) and new.train.loss_weights == {"ct": 3.0, "pet": 1.0}
    assert new.seed == 7 and new.name == "run a" and new.train.resume is None
    assert cfg.model.channels == 8, "override returns a new config and leaves the input alone"


@pytest.mark.parametrize(("item", "expected"), [
    ("model.chanels=3", "override 'model.chanels=3': unknown key 'model.chanels' (did you mean 'channels'?)"),
    ("modle.channels=3", "override 'modle.channels=3': unknown key 'modle' (did you mean 'model'?)"),
    ("model.channels=abc", "override 'model.channels=abc': key 'model.channels' expects int, got 'abc'"),
    ("model.channels", "override 'model.channels': expected KEY.PATH=VALUE"),
    ("name.x=1", "override 'name.x=1': 'name' is a value, not a section"),
])
def test_override_errors(item, expected):
    cfg = load_config({"model": {"channels": 8}}, Experiment)
    with pytest.raises(ConfigError) as info:
        override(cfg, [item])
    assert str(info.value).startswith(expected), str(info.value)
