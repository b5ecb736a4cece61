"""Preference tuning (dpo, simpo, orpo): losses against hand computations, the answer-only log-probs against
full logits, the reference (adapter disabled, cached = live), tiny-model runs that learn, exact resume with
the cached reference, and clear errors for wrong data."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOY_KEYWORDS, toy_rows, write_jsonl
from safetensors.torch import load_file

from hone.config import ConfigError, parse_config
from hone.methods.preference import (
    REFERENCE_FILE,
    collate_pairs,
    dpo_loss,
    group_pairs,
    log1mexp,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)
from hone.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- losses --------------------------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # chosen: policy -2 vs reference -2.5 (+0.5); rejected: -3 vs -2.5 (-0.5); beta 0.5 -> margin 0.5
    losses, cr, rr = dpo_loss(t(-2.0, -4.0), t(-3.0, -1.0), t(-2.5, -4.0), t(-2.5, -2.0), beta=0.5)
    assert cr.tolist() == [0.25, 0.0] and rr.tolist() == [-0.25, 0.5]
    assert losses[0].item() == pytest.approx(-log_sigmoid(0.5), abs=1e-12)
    assert losses[1].item() == pytest.approx(-log_sigmoid(-0.5), abs=1e-12)
    smoothed, _, _ = dpo_loss(t(-2.0), t(-3.0), t(-2.5), t(-2.5), beta=0.5, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(-0.8 * log_sigmoid(0.5) - 0.2 * log_sigmoid(-0.5), abs=1e-12)


def test_dpo_loss_is_log2_when_policy_is_reference():
    losses, cr, rr = dpo_loss(t(-7.0), t(-3.0), t(-7.0), t(-3.0), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(math.log(2)) and cr.item() == rr.item() == 0.0


def test_simpo_loss_by_hand():
    # mean log-probs -1.0 vs -1.5, beta 2 -> rewards -2 and -3; margin 1 minus gamma 0.5
    losses, cr, rr = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=0.5)
    assert (cr.item(), rr.item()) == (-2.0, -3.0)
    assert losses.item() == pytest.approx(-log_sigmoid(0.5), abs=1e-12)


def test_orpo_loss_by_hand():
    # P(chosen) = 0.5 -> odds 1 -> log-odds 0;  P(rejected) = 0.2 -> odds 0.25;  log odds ratio = log 4
    # odds-ratio loss = -log sigmoid(log 4) = -log(4/5);  NLL(chosen) = -log 0.5
    losses, c_odds, r_odds = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), lam=0.1)
    assert c_odds.item() == pytest.approx(0.0, abs=1e-12) and r_odds.item() == pytest.approx(math.log(0.25))
    assert losses.item() == pytest.approx(-math.log(0.5) + 0.1 * -math.log(0.8), abs=1e-12)


def test_orpo_gradient_is_finite_when_an_answer_is_certain():
    mean_chosen = torch.tensor([0.0, -1e-9, -30.0], requires_grad=True)
    losses, _, _ = orpo_loss(mean_chosen, torch.tensor([-2.0, -2.0, -2.0]), lam=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(mean_chosen.grad).all()


@pytest.mark.parametrize("x", [-1e-5, -0.1, -0.69, -0.7, -3.0, -40.0])
def test_log1mexp_matches_float64(x):
    assert log1mexp(torch.tensor([x], dtype=torch.float64)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-9)


# --- batches and log-probs -------------------------------------------------------------------------------

def _pairs(tok):
    from hone.methods.pairs import Pair, tokenize_pair
    from hone.records import Message

    raw = [Pair((Message("user", "hello my invoice please"),), "billing", "shipping"),
           Pair((Message("system", "Route."), Message("user", "where is the package for me today")),
                "shipping now", "login")]
    return [tokenize_pair(tok, p, 64, 128) for p in raw]


def test_answer_logps_equal_full_logits_and_ignore_padding(tiny):
    model, tok = tiny
    pairs = _pairs(tok)
    batch = collate_pairs(pairs, [0, 1], tok.pad_token_id)
    assert batch.input_ids.shape[0] == 4 and batch.target_weight == 2
    assert batch.real_tokens == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    sums, lengths = sequence_logps(model, batch)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    with torch.no_grad():
        for row, (prompt, answer) in enumerate(seqs):
            logp = model(torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
            expected = sum(float(logp[len(prompt) - 1 + j, a]) for j, a in enumerate(answer))
            assert sums[row].item() == pytest.approx(expected, abs=1e-4)
            assert lengths[row].item() == len(answer)
    alone, _ = sequence_logps(model, collate_pairs(pairs, [0], tok.pad_token_id))
    torch.testing.assert_close(alone, torch.stack([sums[0], sums[2]]), atol=1e-5, rtol=1e-5)


def test_group_pairs_respects_batch_tokens(tiny):
    _, tok = tiny
    pairs = _pairs(tok) * 5
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    groups = group_pairs(list(range(10)), pairs, batch_tokens=2 * 3 * longest)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(len(g) <= 3 for g in groups) and group_pairs([0, 1], pairs, batch_tokens=1) == [[0], [1]]


# --- runs on the tiny model ----------------------------------------------------------------------------------

def pair_rows(n: int, seed: int) -> list[dict]:
    """Route-a-ticket pairs where the preferred answer says yes and the other no, at the same length."""
    return [{"prompt": r["text"], "chosen": f"yes, {r['label']}", "rejected": f"no, {r['label']}"}
            for r in toy_rows(n, seed)]


@pytest.fixture
def pref_config(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(60, 1))
    return {"output_dir": str(tmp_path / "runs"), "method": "dpo", "model": {"base": str(tiny_model_dir)},
            "data": {"train": str(train), "max_seq_len": 128, "validation_fraction": 0.2},
            "preference": {"beta": 0.5, "max_prompt_tokens": 64},
            "train": {"max_steps": 12, "learning_rate": 1e-2, "batch_tokens": 1024, "log_every": 2,
                      "eval_every": 6, "save_every": 4, "warmup_ratio": 0.0, "threads": 1},
            "eval": {"enabled": True}}


def run(cfg_dict):
    return run_training(parse_config(cfg_dict), show_progress=False)


def metric_rows(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_dpo_run_raises_reward_accuracy_and_margin(pref_config):
    out = run(pref_config)
    train = metric_rows(out.run_dir, "train")
    assert train[0]["reward_accuracy"] < 0.8 and train[-1]["reward_accuracy"] == 1.0, train
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] + 1.0
    assert train[-1]["loss"] < 0.5 * math.log(2)
    ev = out.summary["eval"]
    assert ev["primary"] == "preference_accuracy" and ev["n"] == 12
    # Before training the policy is the reference: implicit rewards are 0 by construction.
    assert ev["base"]["implicit_reward_accuracy"] == 0.0 and ev["base"]["implicit_reward_margin"] == 0.0
    assert ev["tuned"]["implicit_reward_accuracy"] == 1.0 and ev["tuned"]["implicit_reward_margin"] > 1.0
    assert ev["tuned"]["logp_margin"] > ev["base"]["logp_margin"] + 2.0
    assert ev["tuned"]["preference_accuracy"] >= ev["base"]["preference_accuracy"] + 0.5
    assert (out.run_dir / REFERENCE_FILE).is_file() and (out.run_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_reference_free_methods_learn(pref_config, method):
    pref_config["method"] = method
    pref_config["train"].update(max_steps=8, eval_every=8)
    out = run(pref_config)
    train = metric_rows(out.run_dir, "train")
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] + 0.3, train
    assert train[-1]["reward_accuracy"] == 1.0
    ev = out.summary["eval"]
    assert ev["tuned"]["normalized_logp_margin"] > ev["base"]["normalized_logp_margin"]
    assert "implicit_reward_accuracy" not in ev["tuned"]  # only dpo has a reference
    assert not (out.run_dir / REFERENCE_FILE).exists()
    if method == "orpo":
        assert train[-1]["nll"] < train[0]["nll"]  # its SFT term trains the chosen answers


def _task_and_model(cfg_dict, run_dir):
    from hone.methods import preference
    from hone.models.adapters import apply_weights
    from hone.models.load import load_model
    from hone.train.runlog import RunLog

    cfg = parse_config(cfg_dict)
    loaded = load_model(cfg.model.base)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = preference.build(cfg, preference.validate(cfg), loaded.model, loaded.tokenizer, run_dir, RunLog(run_dir))
    return cfg, task, loaded.model, apply_weights(loaded.model, cfg)


def test_reference_is_base_with_adapter_disabled_and_cache_equals_live(pref_config, tmp_path):
    pref_config["preference"]["precompute_reference"] = False
    cfg, task, base, model = _task_and_model(pref_config, tmp_path / "live")
    spec = task.epoch_plan(0)[0]
    batch = task.collate(spec)
    with torch.no_grad():
        base_logps, _ = sequence_logps(base.get_base_model() if hasattr(base, "get_base_model") else base, batch)
    with torch.no_grad():  # move the adapter away from zero, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    task.before_training(model)
    reference = task.loss_sum.reference
    assert reference.frozen is None and reference.cache is None  # no second model, nothing cached
    live = reference.logps(model, batch)
    policy, _ = sequence_logps(model, batch)
    assert not torch.allclose(policy.detach(), base_logps, atol=1e-3)  # the adapter does change the policy
    # The reference is the model as it started: the same logps as before the adapter existed.
    torch.testing.assert_close(live, torch.stack(base_logps.chunk(2), 1), atol=1e-5, rtol=1e-5)

    pref_config["preference"]["precompute_reference"] = True
    _, task2, _, model2 = _task_and_model(pref_config, tmp_path / "cached")
    base_eval = task2.evaluate(model2)  # the starting model: its held-out log-probs are reused as reference
    assert task2.loss_sum.reference.seen is not None and base_eval["metrics"]["implicit_reward_margin"] == 0.0
    with torch.no_grad():
        for name, p in model2.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    task2.before_training(model2)
    cache = task2.loss_sum.reference.cache
    assert cache.shape == (60, 2)  # every train and held-out pair
    for b in [batch, *task.held_out]:  # computed up front (train) or taken from the base evaluation (held-out)
        torch.testing.assert_close(cache[b.pair_index], reference.logps(model, b), atol=1e-5, rtol=1e-5)
    tuned_eval = task2.evaluate(model2)
    assert tuned_eval["metrics"]["implicit_reward_margin"] != 0.0
    saved = load_file(str(tmp_path / "cached" / REFERENCE_FILE))
    torch.testing.assert_close(saved["chosen"], cache[:, 0])


def test_full_weights_dpo_keeps_a_frozen_copy_without_precompute(pref_config):
    pref_config.update(adapter="full", name="full-live")
    pref_config["preference"]["precompute_reference"] = False
    pref_config["train"].update(max_steps=6, learning_rate=3e-3)
    live = run(pref_config)
    events = (live.run_dir / "events.jsonl").read_text()
    assert "frozen copy" in events
    pref_config["preference"]["precompute_reference"] = True
    pref_config["name"] = "full-cached"
    cached = run(pref_config)
    a, b = metric_rows(live.run_dir, "train"), metric_rows(cached.run_dir, "train")
    assert a[-1]["reward_margin"] > 0.5
    for x, y in zip(a, b):  # the same training whichever way the reference is computed
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-5)


# --- resume -------------------------------------------------------------------------------------------------

def test_killed_dpo_run_resumes_to_the_same_weights_with_the_cached_reference(pref_config, tmp_path):
    from test_loop import _hone, _wait_for, final_weights

    pref_config.update(name="resumable")
    pref_config["train"].update(max_steps=24, save_every=3, eval_every=12, log_every=4)
    pref_config["lora"] = {"dropout": 0.1}
    expected = final_weights(run(dict(pref_config, output_dir=str(tmp_path / "reference"))).run_dir)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(pref_config))
    run_dir = Path(pref_config["output_dir"]) / "resumable"
    proc = _hone("train", str(cfg_path))
    _wait_for(run_dir / "checkpoints", "step-000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / REFERENCE_FILE).is_file() and not (run_dir / "final").exists()
    cached_at = (run_dir / REFERENCE_FILE).stat().st_mtime_ns
    resumed = _hone("train", str(cfg_path), "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert (run_dir / REFERENCE_FILE).stat().st_mtime_ns == cached_at  # reloaded, not recomputed
    assert "reloaded log-probs" in (run_dir / "events.jsonl").read_text()
    got = final_weights(run_dir)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resume"


# --- wrong data and config ----------------------------------------------------------------------------------

def test_sft_data_given_to_dpo_names_the_fields_and_the_line(pref_config, tmp_path):
    from hone.train.prepare import DataProblems

    label = list(TOY_KEYWORDS)[0]
    rows = [{"text": "my invoice", "label": label}, *pair_rows(5, 2)]
    pref_config["data"]["train"] = str(write_jsonl(tmp_path / "sft.jsonl", rows))
    with pytest.raises(DataProblems) as err:
        run(pref_config)
    message = str(err.value)
    assert "sft.jsonl:1" in message and "missing 'chosen' and 'rejected'" in message
    assert "'prompt', 'chosen' and 'rejected'" in message and "sft.jsonl:2" not in message
    assert not (Path(pref_config["output_dir"])).exists() or not any(Path(pref_config["output_dir"]).glob("*/final"))


def test_no_valid_pair_at_all(pref_config, tmp_path):
    from hone.train.prepare import DataProblems

    pref_config["data"]["train"] = str(write_jsonl(tmp_path / "msgs.jsonl", [{"messages": [{"role": "user",
                                                                                      "content": "hi"}]}]))
    with pytest.raises(DataProblems, match=r"msgs.jsonl: no line is a valid example for method 'dpo'"):
        run(pref_config)


def test_config_clashes_are_refused_before_loading(pref_config):
    pref_config["preference"]["max_prompt_tokens"] = 128
    with pytest.raises(ConfigError, match=r"max_prompt_tokens \(128\) must be below data.max_seq_len \(128\)"):
        run(pref_config)
    pref_config["preference"]["max_prompt_tokens"] = 64
    pref_config["adapter"] = "prompt"
    with pytest.raises(ConfigError, match="adapter: prompt"):
        run(pref_config)


def test_too_long_pairs_error_or_skip(pref_config, tmp_path):
    from hone.train.prepare import DataProblems

    rows = pair_rows(20, 3)
    rows[4]["prompt"] = "word " * 200
    pref_config["data"].update(train=str(write_jsonl(tmp_path / "long.jsonl", rows)), on_too_long="error")
    with pytest.raises(DataProblems, match="longer than data.max_seq_len=128"):
        run(pref_config)
    pref_config["data"]["on_too_long"] = "skip"
    pref_config["train"].update(max_steps=1)
    pref_config["eval"]["enabled"] = False
    out = run(pref_config)
    rejects = (out.run_dir / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and json.loads(rejects[0])["code"] == "too_long"


# --- the hh-rlhf bench split ----------------------------------------------------------------------------------

def _bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "preference_hh.py"
    spec = importlib.util.spec_from_file_location("preference_hh", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hh_split_is_deterministic_and_disjoint():
    bench = _bench()
    if not bench.HH_PAIRS.is_file():
        pytest.skip(f"{bench.HH_PAIRS} not on this machine")
    train, held = bench.hh_split(bench.HH_PAIRS, seed=0)
    assert (len(train), len(held)) == (bench.TRAIN_CANDIDATES, bench.HELD_OUT)
    key = lambda r: (r["chosen"], r["rejected"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert bench.hh_split(bench.HH_PAIRS, seed=0) == (train, held)
    assert bench.hh_split(bench.HH_PAIRS, seed=1)[1] != held


def test_hh_bench_skips_without_the_dataset(tmp_path, monkeypatch, capsys):
    bench = _bench()
    monkeypatch.setattr("sys.argv", ["preference_hh.py", "--data", str(tmp_path / "absent.jsonl.gz"),
                                     "--out", str(tmp_path / "out")])
    assert bench.main() == 0
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "out").exists()
