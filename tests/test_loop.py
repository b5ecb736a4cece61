"""The training loop on the tiny model: learning, accumulation, non-finite guards, signals, exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hone.config import parse_config
from hone.train.run import run_training


def run(cfg_dict, **kw):
    return run_training(parse_config(cfg_dict), show_progress=False, **kw)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").is_file() else "model.safetensors"
    return load_file(str(final / name))


def metrics(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_run_directory_contract(tiny_config):
    out = run(tiny_config)
    d = out.run_dir
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "events.jsonl", "report.md", "report.html"):
        assert (d / name).is_file(), name
    assert (d / "final" / "adapter_model.safetensors").is_file()
    assert (d / "plots" / "loss.png").is_file()
    steps = sorted(int(p.name.split("-")[1]) for p in (d / "checkpoints").iterdir())
    assert steps == [4, 6]  # save_every=2, keep_checkpoints=2
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and len(manifest["data"]["train_sha256"]) == 64
    resolved = yaml.safe_load((d / "config.yaml").read_text())
    assert resolved["lora"]["r"] == 16 and resolved["train"]["max_steps"] == 6  # defaults spelled out
    assert [r["step"] for r in metrics(d, "validation")] == [3, 6]


def test_loss_falls(tiny_config):
    tiny_config["train"].update(max_steps=30, log_every=5)
    tiny_config["method"] = "full"
    out = run(tiny_config)
    losses = [r["loss"] for r in metrics(out.run_dir, "train")]
    assert losses[-1] < 0.5 * losses[0], losses


def _prepared_lora(tiny_config, tiny_model_dir, tmp_path):
    """(cfg, LoRA model, SFT task) for driving the loop directly."""
    from hone.methods import sft
    from hone.models.adapters import apply_weights
    from hone.models.load import load_model
    from hone.train.runlog import RunLog

    cfg = parse_config(tiny_config)
    loaded = load_model(str(tiny_model_dir))
    task = sft.build(cfg, sft.validate(cfg), loaded.model, loaded.tokenizer, tmp_path, RunLog(tmp_path))
    task.held_out = []
    return cfg, apply_weights(loaded.model, cfg), task


def test_trainable_change_frozen_stay(tiny_config, tiny_model_dir, tmp_path):
    from hone.train.loop import train_loop
    from hone.train.runlog import RunLog

    cfg, model, task = _prepared_lora(tiny_config, tiny_model_dir, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_loop(model, task, cfg, tmp_path, RunLog(tmp_path), show_progress=False)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]) or "lora_A" in n, f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_accumulation_equals_large_batch(tiny_config):
    """8 rows in one micro-batch == 8 micro-batches of one row, accumulated (loss normalised by target tokens)."""
    tiny_config["train"].update(max_steps=2, save_every=100, eval_every=100)
    big = dict(tiny_config, name="big", train={**tiny_config["train"], "batch_tokens": 8 * 256, "grad_accum": 1})
    small = dict(tiny_config, name="small", train={**tiny_config["train"], "batch_tokens": 256, "grad_accum": 8})
    a, b = final_weights(run(big).run_dir), final_weights(run(small).run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    lora_b = next(k for k in a if "lora_B" in k)
    assert a[lora_b].abs().sum() > 0  # the comparison is between trained weights, not zeros


def test_non_finite_steps_are_skipped_then_fail(tiny_config, tiny_model_dir, tmp_path):
    from hone.methods.sft import sft_loss_sum
    from hone.train.loop import TrainingFailed, train_loop
    from hone.train.runlog import RunLog

    cfg, model, task = _prepared_lora(tiny_config, tiny_model_dir, tmp_path)
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += 1
        loss = sft_loss_sum(m, batch)
        return loss * float("nan") if calls["n"] >= 3 else loss

    run_dir = tmp_path / "nan-run"
    run_dir.mkdir()
    with pytest.raises(TrainingFailed, match=r"step 5: 3 non-finite"):
        task.loss_sum = poisoned
        train_loop(model, task, cfg, run_dir, RunLog(run_dir), show_progress=False)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == ["step-000002"]  # nothing written from the failing steps
    warnings = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["level"] == "warn" for e in warnings) == 3
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_tuned_beats_untuned_on_toy_task(tiny_config):
    tiny_config["method"] = "full"
    tiny_config["data"]["instruction"] = "Route: {labels}."
    tiny_config["train"].update(max_steps=100, learning_rate=3e-3, save_every=1000, eval_every=1000, log_every=10)
    tiny_config["eval"] = {"enabled": True, "max_new_tokens": 4}
    out = run(tiny_config)
    ev = out.summary["eval"]
    assert ev["tuned"]["accuracy"] >= ev["base"]["accuracy"] + 0.5, ev
    assert "beats the base model" in (out.run_dir / "report.md").read_text()


# ---- resume: killed runs continue to the same weights ------------------------------------------------------

def _write_cfg(tiny_config, tmp_path, **train) -> Path:
    cfg = dict(tiny_config, name="resumable")
    cfg["train"] = {**tiny_config["train"], "max_steps": 120, "save_every": 5, "log_every": 10, "eval_every": 40,
                    "keep_checkpoints": 3, **train}
    cfg["lora"] = {"dropout": 0.1}  # dropout draws random numbers: resume must restore the RNG too
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _hone(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hone", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path_glob_dir: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path_glob_dir.is_dir() and any(path_glob_dir.glob(pattern)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {pattern} appeared:\n{proc.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {pattern}")


@pytest.fixture
def reference_run(tiny_config, tmp_path):
    """An uninterrupted run's final weights (same config as the interrupted ones, another output dir)."""
    cfg_path = _write_cfg(tiny_config, tmp_path)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["output_dir"] = str(tmp_path / "reference")
    return final_weights(run(raw).run_dir), cfg_path


@pytest.mark.parametrize("kill_after", ["step-000005", "step-000045"])
def test_sigkill_then_resume_is_bitwise_identical(reference_run, tmp_path, kill_after):
    expected, cfg_path = reference_run
    run_dir = Path(yaml.safe_load(cfg_path.read_text())["output_dir"]) / "resumable"
    proc = _hone("train", str(cfg_path))
    _wait_for(run_dir / "checkpoints", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()
    resumed = _hone("train", str(cfg_path), "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    got = final_weights(run_dir)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resume"


def test_sigterm_saves_checkpoint_and_resumes(reference_run, tmp_path):
    expected, cfg_path = reference_run
    run_dir = Path(yaml.safe_load(cfg_path.read_text())["output_dir"]) / "resumable"
    proc = _hone("train", str(cfg_path))
    _wait_for(run_dir / "checkpoints", "step-000010", proc)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "Traceback" not in log and "--resume" in log
    events = (run_dir / "events.jsonl").read_text()
    assert "stopped by SIGTERM" in events
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    resumed = _hone("train", str(cfg_path), "--resume")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    got = final_weights(run_dir)
    for k in expected:
        assert torch.equal(got[k], expected[k])


def test_resume_refuses_changed_config(tiny_config, tmp_path):
    cfg_path = _write_cfg(tiny_config, tmp_path, max_steps=4)
    proc = _hone("train", str(cfg_path))
    assert proc.wait(timeout=120) == 0
    again = _hone("train", str(cfg_path), "--resume", "--set", "train.learning_rate=0.5")
    log = again.communicate(timeout=120)[0]
    assert again.returncode == 2 and "train.learning_rate" in log


def test_half_written_checkpoint_is_ignored(tmp_path):
    from hone.train.checkpoint import latest_checkpoint

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-000004").mkdir(parents=True)
    (ckpts / "step-000004" / "state.json").write_text("{}")
    (ckpts / ".tmp-step-000008-123").mkdir()  # a writer died mid-way
    (ckpts / "step-000006").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_lr_schedule_shapes():
    from hone.train.loop import lr_multiplier

    assert lr_multiplier(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "linear") == pytest.approx(0.0)
    assert lr_multiplier(50, 100, 0, "constant") == 1.0
    assert math.isclose(lr_multiplier(10, 100, 10, "cosine"), 1.0)


@pytest.mark.parametrize("method,marker", [("dora", "lora_magnitude_vector"), ("ia3", "ia3_l")])
def test_adapter_variants_train_save_and_load(tiny_config, method, marker):
    """DoRA and (IA)3 train only their own parameters, lower the loss, and load back from the run."""
    from hone.models.load import load_model
    from hone.train.run import count_params

    tiny_config["method"] = method
    tiny_config["train"].update(max_steps=12, learning_rate=1e-2 if method == "ia3" else 3e-3)
    outcome = run(tiny_config)
    losses = [r["loss"] for r in metrics(outcome.run_dir, "train")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    weights = final_weights(outcome.run_dir)
    assert weights and all(marker in k or "lora_" in k for k in weights), list(weights)[:5]
    assert any(marker in k for k in weights)
    loaded = load_model(str(outcome.run_dir))
    trainable, total = count_params(loaded.model)
    assert trainable == 0 and total > 0  # loaded for inference: frozen
    lora_run = run(dict(tiny_config, method="lora", name="lora-ref"))
    if method == "ia3":  # (IA)3 trains far fewer parameters than LoRA r16
        assert sum(v.numel() for v in weights.values()) * 10 < sum(v.numel() for v in final_weights(lora_run.run_dir).values())
