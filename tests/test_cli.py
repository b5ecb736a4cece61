"""The commands as a user runs them: real files in, exit codes and messages out."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from hone.cli import app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def cfg_file(tiny_config, tmp_path):
    def write(cfg=tiny_config):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


def test_data_validate_names_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "hello"}\n'
                   '{"messages": [{"role": "user", "content": "x"}]}\n'
                   'not json\n'
                   '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    result = invoke("data", "validate", bad, "--rejects", tmp_path / "rejects.jsonl")
    assert result.exit_code == 2
    assert f"{bad}:2: [no_assistant_turn]" in result.output
    assert f"{bad}:3: [invalid_json]" in result.output
    assert f"{bad}:4: [unknown_role]" in result.output
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4]


def test_data_validate_good_file(toy_files):
    result = invoke("data", "validate", toy_files[0])
    assert result.exit_code == 0
    assert "90 valid" in result.output and "billing" in result.output


def test_train_stops_on_bad_line_before_loading_a_model(cfg_file, tiny_config, tmp_path):
    bad = tmp_path / "train_bad.jsonl"
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines.insert(4, '{"text": "", "label": "billing"}')
    bad.write_text("\n".join(lines) + "\n")
    tiny_config["data"]["train"] = str(bad)
    tiny_config["model"]["base"] = str(tmp_path / "no-such-model")  # never reached: data is checked first
    result = invoke("train", cfg_file(tiny_config))
    assert result.exit_code == 2
    assert f"{bad}:5: [empty_content]" in result.output
    assert "skip_bad_lines" in result.output


def test_skip_bad_lines_writes_rejects(cfg_file, tiny_config, tmp_path):
    bad = tmp_path / "train_bad.jsonl"
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines.insert(4, '{"text": "", "label": "billing"}')
    bad.write_text("\n".join(lines) + "\n")
    tiny_config["data"].update(train=str(bad), skip_bad_lines=True)
    tiny_config["train"]["max_steps"] = 2
    result = invoke("train", cfg_file(tiny_config))
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs").iterdir())
    rejects = [json.loads(x) for x in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": str(bad), "line": 5, "code": "empty_content", "message": rejects[0]["message"],
                        "raw": '{"text": "", "label": "billing"}'}]
    report = (run_dir / "report.md").read_text()
    assert "90" in report  # every good line was kept


def test_config_typo_names_key(cfg_file, tiny_config):
    tiny_config["train"]["learning_rat"] = 0.1
    result = invoke("train", cfg_file(tiny_config))
    assert result.exit_code == 2 and "train.learning_rat" in result.output


def test_set_override_and_missing_model(cfg_file, tmp_path):
    result = invoke("train", cfg_file(), "--set", f"model.base={tmp_path / 'nope'}")
    assert result.exit_code == 2
    assert "allow_download" in result.output  # says what would fix it


def test_train_then_eval_generate_chat(cfg_file, toy_files):
    result = invoke("train", cfg_file())
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    run_dir = next(p for p in (toy_files[0].parent / "runs").iterdir())
    scored = invoke("eval", run_dir, "--data", toy_files[1], "--max-new-tokens", 4, "--out", run_dir / "e.json")
    assert scored.exit_code == 0, scored.output
    assert "accuracy" in scored.output
    result = json.loads((run_dir / "e.json").read_text())
    assert result["n"] == 30 and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    answer = invoke("generate", run_dir, "--prompt", "my package is late", "--max-new-tokens", 3)
    assert answer.exit_code == 0
    talk = invoke("chat", run_dir, "--max-new-tokens", 3, input="hello\n/reset\nagain\n/exit\n")
    assert talk.exit_code == 0 and talk.output.count("model>") == 2


def test_eval_base_model_on_file(tiny_model_dir, toy_files):
    result = invoke("eval", tiny_model_dir, "--data", toy_files[1], "--max-examples", 5, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert "5 examples" in result.output.replace("\n", " ") or "(5" in result.output


def test_resume_without_run_is_an_error(cfg_file):
    result = invoke("train", cfg_file(), "--resume")
    assert result.exit_code == 2 and "no run named" in result.output


def test_all_lines_bad_even_when_skipping(cfg_file, tiny_config, tmp_path):
    bad = tmp_path / "all_bad.jsonl"
    bad.write_text('{"text": ""}\nnot json\n')
    tiny_config["data"].update(train=str(bad), skip_bad_lines=True)
    result = invoke("train", cfg_file(tiny_config))
    assert result.exit_code == 2
    assert "no line is a valid training example" in result.output and f"{bad}:2: [invalid_json]" in result.output
