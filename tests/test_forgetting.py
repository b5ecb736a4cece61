"""The forgetting check: general-text perplexity base vs tuned, measured with cpt's own function (and taken
from cpt's evaluation for method cpt), flagged beyond eval.forgetting_threshold, off for non-LM methods."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from test_cpt import cpt_config, domain_docs  # noqa: F401  (cpt_config is a fixture)

from hone.config import parse_config
from hone.methods import cpt
from hone.methods.sft import packed_batches, reference_loss_sum
from hone.models.load import load_model
from hone.train import run as run_module
from hone.train.run import RunError, forgetting_text_path, run_training

# Words the toy routing task never uses: training on it moves probability away from them.
UNRELATED = ["zebra quantum xylophone", "orbit glacier violin", "meadow tungsten saxophone", "harbor lattice oboe"]


def run(cfg_dict, **kw):
    return run_training(parse_config(cfg_dict), show_progress=False, **kw)


def perplexity_by_hand(model, tokenizer, path, block: int) -> float:
    """exp(mean cross-entropy) through the model's own forward (full logits), not the loop's fast path."""
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    blocks, _ = cpt.pack_documents(tokenizer, docs, block, tokenizer.eos_token_id)
    total = targets = 0.0
    model.eval()
    with torch.no_grad():
        for batch in packed_batches(blocks, block, 2, tokenizer.pad_token_id):
            total += float(reference_loss_sum(model, batch))
            targets += batch.target_weight
    return math.exp(total / targets)


@pytest.mark.parametrize("method,general,enabled,on", [("lora", "builtin", True, True), ("dpo", "builtin", True, True),
                                                       ("reward", "builtin", True, False),
                                                       ("contrastive", "builtin", True, False),
                                                       ("lora", None, True, False), ("lora", "builtin", False, False)])
def test_check_is_on_for_causal_lm_objectives_only(method, general, enabled, on):
    cfg = parse_config({"method": method, "data": {"train": "x.jsonl"},
                        "eval": {"general_text": general, "enabled": enabled}})
    assert (forgetting_text_path(cfg) == cpt.GENERAL_TEXT) is on
    if not on:
        assert forgetting_text_path(cfg) is None


def test_sft_measures_base_and_tuned_and_flags(tiny_config, tmp_path, one_torch_thread):
    # A base that knows the general text (continued pretraining on it), then fine-tuned on the toy task:
    # the general text's perplexity must rise, which is what the check is there to catch.
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in UNRELATED * 3])
    train = {**tiny_config["train"], "max_steps": 30, "learning_rate": 3e-3, "eval_every": 1000, "save_every": 1000,
             "log_every": 10, "precision": "fp32"}  # fp32: compared with an fp32 computation below
    knows = run({**tiny_config, "name": "knows-general", "method": "cpt", "adapter": "full", "train": train,
                 "data": {"train": str(general), "max_seq_len": 64}})
    cfg = {**tiny_config, "method": "full", "model": {"base": str(knows.run_dir)}, "train": train,
           "eval": {"enabled": True, "max_new_tokens": 2, "general_text": str(general), "forgetting_threshold": 0.05}}
    out = run(cfg)
    fg = json.loads((out.run_dir / "forgetting.json").read_text())
    assert out.summary["forgetting"] == json.loads((out.run_dir / "manifest.json").read_text())["forgetting"] == fg
    block = tiny_config["data"]["max_seq_len"]
    base = load_model(str(knows.run_dir))
    assert fg["base_perplexity"] == pytest.approx(perplexity_by_hand(base.model, base.tokenizer, general, block),
                                                  rel=1e-4)
    tuned = load_model(str(out.run_dir))
    assert fg["tuned_perplexity"] == pytest.approx(perplexity_by_hand(tuned.model, tuned.tokenizer, general, block),
                                                   rel=1e-4)
    assert fg["change"] == pytest.approx(fg["tuned_perplexity"] / fg["base_perplexity"] - 1)
    assert fg["change"] > 0.05 and fg["flagged"] is True, fg
    report = (out.run_dir / "report.md").read_text()
    assert "## Forgetting check" in report and "Forgetting: general-text perplexity rose" in report
    events = (out.run_dir / "events.jsonl").read_text()
    assert "forgetting: general-text perplexity" in events


def test_not_flagged_under_threshold(tiny_config, tmp_path, one_torch_thread):
    tiny_config["train"].update(max_steps=2)
    tiny_config["eval"] = {"enabled": True, "max_new_tokens": 2, "forgetting_threshold": 100.0}
    fg = run(tiny_config).summary["forgetting"]
    assert fg["file"] == str(cpt.GENERAL_TEXT) and fg["tokens"] > 1000
    assert fg["flagged"] is False


def test_cpt_reuses_its_own_measurement(cpt_config, monkeypatch, one_torch_thread):  # noqa: F811
    calls = []
    real = run_module.general_perplexity
    monkeypatch.setattr(run_module, "general_perplexity", lambda *a: calls.append(a) or real(*a))
    out = run(cpt_config)
    fg = out.summary["forgetting"]
    base = json.loads((out.run_dir / "eval_base.json").read_text())["metrics"]
    tuned = json.loads((out.run_dir / "eval_tuned.json").read_text())["metrics"]
    assert fg["base_perplexity"] == base["general_perplexity"]
    assert fg["tuned_perplexity"] == tuned["general_perplexity"]
    assert calls == []  # measured once, by cpt's evaluation


def test_off_when_null(tiny_config, one_torch_thread):
    tiny_config["train"].update(max_steps=1)
    tiny_config["eval"] = {"enabled": True, "max_new_tokens": 2, "general_text": None}
    out = run(tiny_config)
    assert out.summary["forgetting"] is None and not (out.run_dir / "forgetting.json").exists()
    assert "Forgetting check" not in (out.run_dir / "report.md").read_text()


def test_missing_or_bad_file_stops_before_any_model_loads(tiny_config, tmp_path, monkeypatch):
    from hone.train.prepare import DataProblems

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_for_training", no_model)
    tiny_config["eval"] = {"enabled": True, "general_text": str(tmp_path / "nope.jsonl")}
    with pytest.raises(RunError, match=r"eval.general_text: .*nope.jsonl does not exist"):
        run(tiny_config)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": []}\n')
    tiny_config["eval"]["general_text"] = str(bad)
    with pytest.raises(DataProblems, match="eval.general_text"):
        run(dict(tiny_config, name="bad-general"))
