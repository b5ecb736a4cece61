"""Config: defaults, YAML + --set overrides, errors that name the key, path resolution, dump round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hone.config import EMBEDDED_MODEL, ConfigError, RunConfig, dump_config, load_config, parse_config


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_minimal_config_resolves_with_every_default():
    cfg = parse_config({"data": {"train": "x.jsonl"}})
    assert cfg.data.train == "x.jsonl"
    assert cfg.data.validation is None
    assert cfg.model.base == EMBEDDED_MODEL and cfg.model.allow_download is False
    assert cfg.model.trust_remote_code is False
    assert cfg.method == "lora" and cfg.output_dir == "runs" and cfg.name is None
    assert cfg.data.loss_on == "assistant" and cfg.data.max_seq_len == 1024 and cfg.data.on_too_long == "truncate"
    assert cfg.train.learning_rate == 2e-4 and cfg.train.epochs == 2 and cfg.train.max_steps is None
    assert cfg.train.betas == (0.9, 0.999) and cfg.train.max_grad_norm == 1.0
    assert cfg.lora.r == 16 and cfg.lora.target_modules == "all-linear"
    assert cfg.eval.enabled is True
    # Every field of the resolved config equals the declared default (nothing silently set elsewhere).
    for section in ("model", "lora", "train", "eval"):
        model = getattr(cfg, section)
        for name, field in type(model).model_fields.items():
            assert getattr(model, name) == field.get_default(call_default_factory=True), f"{section}.{name}"


def test_missing_train_file_is_named():
    with pytest.raises(ConfigError, match=r"data\.train"):
        parse_config({"data": {}})
    with pytest.raises(ConfigError, match=r"\bdata\b"):
        parse_config({})


def test_yaml_file_plus_set_overrides_parse_yaml_values(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = write_yaml(tmp_path / "run.yaml", {
        "data": {"train": "train.jsonl"},
        "train": {"epochs": 3, "max_grad_norm": 0.5, "save_every": 10},
        "lora": {"r": 4},
    })
    cfg = load_config(path, [
        "train.epochs=1.5",                      # float overrides the file's value
        "train.max_steps=7",                     # int
        "train.learning_rate=1e-4",              # YAML 1.1 reads this as a string; pydantic must still coerce
        "eval.enabled=false",                    # boolean
        "model.allow_download=true",
        "train.betas=[0.8, 0.95]",               # list -> tuple
        "lora.target_modules=[q_proj, v_proj]",  # list of strings
        "train.max_grad_norm=null",              # null
        "train.save_every=",                     # empty value -> null
        "name=my run",                           # top-level string with a space
        "data.on_too_long=skip",
    ])
    assert cfg.train.epochs == 1.5
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.eval.enabled is False and cfg.model.allow_download is True
    assert cfg.train.betas == (0.8, 0.95)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_grad_norm is None and cfg.train.save_every is None
    assert cfg.name == "my run" and cfg.data.on_too_long == "skip"
    assert cfg.lora.r == 4  # untouched file values survive


def test_set_alone_without_a_file():
    cfg = load_config(None, ["data.train=/abs/train.jsonl", "train.seed=3"])
    assert cfg.data.train == "/abs/train.jsonl" and cfg.train.seed == 3


@pytest.mark.parametrize("raw, key", [
    ({"data": {"train": "x"}, "train": {"learning_rat": 0.1}}, "train.learning_rat"),
    ({"data": {"train": "x", "max_seq": 5}}, "data.max_seq"),
    ({"data": {"train": "x"}, "trian": {"epochs": 1}}, "trian"),
])
def test_unknown_key_is_a_config_error_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, source="cfg.yaml")
    assert key in str(e.value) and "cfg.yaml" in str(e.value)


def test_unknown_key_from_set_and_from_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        load_config(None, ["data.train=x", "train.learning_rat=0.1"])
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": "x"}, "lora": {"rank": 8}})
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=lots", "train.epochs"),
    ("train.max_steps=[1, 2]", "train.max_steps"),
    ("method=qlor", "method"),
    ("data.validation_fraction=1.5", "data.validation_fraction"),
    ("data.loss_on=everything", "data.loss_on"),
    ("train.batch_tokens=4", "train.batch_tokens"),
])
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x", override])
    named_keys = [line.strip().split(":")[0] for line in str(e.value).splitlines()[1:]]
    assert named_keys == [key]


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "train.jsonl").write_text("{}\n")
    (cfg_dir / "data" / "val.jsonl").write_text("{}\n")
    path = write_yaml(cfg_dir / "hone.yaml", {"data": {"train": "data/train.jsonl", "validation": "data/val.jsonl"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert Path(cfg.data.train) == cfg_dir / "data" / "train.jsonl"
    assert Path(cfg.data.validation) == cfg_dir / "data" / "val.jsonl"
    assert Path(cfg.data.train).is_file()


def test_absolute_data_paths_are_kept(tmp_path):
    train = tmp_path / "abs_train.jsonl"
    train.write_text("{}\n")
    path = write_yaml(tmp_path / "sub" / "c.yaml", {"data": {"train": str(train)}})
    assert load_config(path).data.train == str(train)


def test_set_without_equals_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE") as e:
        load_config(None, ["data.train=x", "train.learning_rate"])
    assert "train.learning_rate" in str(e.value)


def test_set_into_a_value_errors():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["data.train=x", "data.train.deeper=1"])


def test_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_dump_config_round_trips_through_parse_config():
    cfg = parse_config({
        "name": "r1", "method": "full",
        "data": {"train": "/d/t.jsonl", "validation": "/d/v.jsonl", "loss_on": "all"},
        "train": {"betas": [0.8, 0.9], "max_grad_norm": None, "max_steps": 9, "learning_rate": 1e-5},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "eval": {"enabled": False},
    })
    text = dump_config(cfg)
    raw = yaml.safe_load(text)
    assert set(raw) == set(RunConfig.model_fields)  # fully resolved: every section written out
    again = parse_config(raw)
    assert again == cfg
    assert dump_config(again) == text
    # The default config round-trips too.
    base = parse_config({"data": {"train": "x"}})
    assert parse_config(yaml.safe_load(dump_config(base))) == base
