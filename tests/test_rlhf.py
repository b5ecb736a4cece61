"""method: rlhf (GRPO): rows and rewards checked before a model loads, the loss pieces against hand
computation, a tiny-model run that raises the held-out reward, and exact resume of a sampled run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_rows, write_jsonl
from hone.config import ConfigError, parse_config
from hone.methods import RowError, rlhf
from hone.methods.rewards import RewardError, load_scorer, resolve_reward
from hone.train.prepare import DataProblems
from hone.train.run import run_training

DIGITS = "def digits(prompt, completion, reference):\n    return sum(c.isdigit() for c in completion) / max(1, len(completion))\n"


# --- rows --------------------------------------------------------------------------------------------


def test_row_shapes():
    text = rlhf.parse_prompt_row({"prompt": "2+2?", "answer": "4"})
    assert [(m.role, m.content) for m in text.messages] == [("user", "2+2?")]
    assert text.given == "2+2?" and text.reference == "4"

    chat = rlhf.parse_prompt_row({"prompt": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}], "reference": "hello"})
    assert chat.given == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

    convo = rlhf.parse_prompt_row({"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]})
    assert [m.role for m in convo.messages] == ["user"] and convo.reference == "a"
    open_ended = rlhf.parse_prompt_row({"messages": [{"role": "user", "content": "q"}]})
    assert open_ended.reference is None

    completion = rlhf.parse_prompt_row({"prompt": "q", "completion": "c"})
    assert completion.reference == "c"
    label = rlhf.parse_prompt_row({"text": "my invoice", "label": "billing"})
    assert label.reference == label.label == "billing" and label.given == "my invoice"


@pytest.mark.parametrize("row, code", [
    ({"question": "x"}, "missing_field"),
    ({"prompt": ""}, "empty_content"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "no_user_turn"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "unknown_role"),
    ({"prompt": "q", "reference": 4}, "bad_type"),
])
def test_row_errors(row, code):
    with pytest.raises(RowError) as e:
        rlhf.parse_prompt_row(row)
    assert e.value.code == code


def test_reference_required_only_when_the_reward_compares(tmp_path):
    rlhf.parse_prompt_row({"prompt": "q"})  # a reward function or model may not need one
    with pytest.raises(RowError, match="no reference"):
        rlhf.parse_prompt_row({"prompt": "q"}, needs_reference=True)


def _cfg(tmp_path, train_rows, **rlhf_cfg) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    return {"method": "rlhf", "output_dir": str(tmp_path / "runs"), "data": {"train": str(train)},
            "rlhf": {"reward": "exact_match", **rlhf_cfg}}


def test_validate_names_the_line_and_the_fields(tmp_path):
    rows = [{"prompt": "a", "reference": "x"}, {"prompt": "b"}, {"prompt": "c", "reference": "y"},
            {"text": "no label"}]
    with pytest.raises(DataProblems) as e:
        rlhf.validate(parse_config(_cfg(tmp_path, rows)))
    message = str(e.value)
    assert "train.jsonl:2: [missing_field] no reference" in message and "train.jsonl:4" in message
    assert "'prompt' (text or chat messages)" in message  # which fields the method needs


def test_label_rows_get_the_instruction_with_every_label(tmp_path):
    data = rlhf.validate(parse_config(_cfg(tmp_path, toy_rows(30, 1))))
    assert data.labels == ["billing", "login", "shipping"]
    system, user = data.train[0].messages
    assert system.role == "system" and "billing, login, shipping" in system.content and user.role == "user"
    assert all(r.messages[0].role == "system" for r in data.held_out)


def test_prompt_room_is_checked(tmp_path):
    cfg = _cfg(tmp_path, toy_rows(10, 1), max_new_tokens=120)
    cfg["data"]["max_seq_len"] = 64
    with pytest.raises(ConfigError, match="max_new_tokens"):
        rlhf.validate(parse_config(cfg))


# --- rewards -----------------------------------------------------------------------------------------


def test_builtin_rewards_score_against_the_reference():
    score = load_scorer(resolve_reward("exact_match"))
    assert score(["p", "p"], ["The Billing.", "billing please"], ["billing", "billing"]) == [1.0, 0.0]
    f1 = load_scorer(resolve_reward("token_f1"))
    assert f1(["p"], ["billing please"], ["billing"]) == [pytest.approx(2 / 3)]
    assert resolve_reward("exact_match").metric == "reward_exact_match"


def test_label_match_reads_answers_against_the_label_set():
    reward = resolve_reward("label_match")
    assert reward.needs_reference and reward.metric == "reward_label_accuracy"
    score = load_scorer(reward, ["billing", "login", "card arrival"])
    answers = ["Billing.", "It is billing or login", "The card arrival is late", "no idea", "login"]
    assert score(["p"] * 5, answers, ["billing", "billing", "card arrival", "login", "billing"]) == [
        1.0, 0.0, 1.0, 0.0, 0.0]  # naming two labels is no answer, so listing them all earns nothing
    with pytest.raises(RewardError, match="needs a label set"):
        load_scorer(reward, [])


def test_function_rewards_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(DIGITS + "def two(prompt, completion):\n    return 0\nVALUE = 3\n")
    by_file = resolve_reward(f"{tmp_path / 'my_rewards.py'}:digits")
    assert load_scorer(by_file)(["p"], ["a1"], [None]) == [0.5]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards:digits").kind == "function"
    with pytest.raises(RewardError, match=r"cannot be called as two\(prompt, completion, reference\)"):
        resolve_reward("my_rewards:two")
    with pytest.raises(RewardError, match="not a function"):
        resolve_reward("my_rewards:VALUE")
    with pytest.raises(RewardError, match="has no 'missing'"):
        resolve_reward("my_rewards:missing")


@pytest.mark.parametrize("spec, message", [
    (None, "needs rlhf.reward"),
    ("exact_matc", "not a built-in reward"),
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
    ("nowhere/rw.py:fn", "not found"),
])
def test_bad_reward_names_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_reward(spec)


def test_a_bad_reward_stops_the_run_before_anything_loads(tmp_path):
    cfg = _cfg(tmp_path, toy_rows(10, 1))
    cfg["rlhf"]["reward"] = "rewards_nowhere:score"
    cfg["model"] = {"base": str(tmp_path / "no-such-model")}  # would fail to load, if it were reached
    with pytest.raises(ConfigError, match="rewards_nowhere"):
        run_training(parse_config(cfg), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_reward_run_directory_is_checked(tmp_path):
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    with pytest.raises(RewardError, match="not a hone run"):
        resolve_reward(str(not_a_run))
    sft_run = tmp_path / "sft"
    (sft_run / "final").mkdir(parents=True)
    (sft_run / "config.yaml").write_text("method: lora\n")
    with pytest.raises(RewardError, match="method 'lora', not 'reward'"):
        resolve_reward(str(sft_run))
    unfinished = tmp_path / "rm"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: reward\n")
    with pytest.raises(RewardError, match="no final/"):
        resolve_reward(str(unfinished))
    (unfinished / "final").mkdir()
    assert resolve_reward(str(unfinished)).kind == "model"


def test_reward_values_are_checked(tmp_path):
    (tmp_path / "bad.py").write_text("def text(p, c, r):\n    return 'high'\ndef boom(p, c, r):\n    raise KeyError(r)\n"
                                     "def nan(p, c, r):\n    return float('nan')\ndef flag(p, c, r):\n    return True\n")
    def scorer(name):
        return load_scorer(resolve_reward(f"{tmp_path / 'bad.py'}:{name}"))
    with pytest.raises(RewardError, match="returned 'high'"):
        scorer("text")(["p"], ["c"], [None])
    with pytest.raises(RewardError, match="raised KeyError"):
        scorer("boom")(["p"], ["c"], ["x"])
    with pytest.raises(RewardError, match="finite number"):
        scorer("nan")(["p"], ["c"], [None])
    assert scorer("flag")(["p"], ["c"], [None]) == [1.0]


# --- the loss, by hand -------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = rlhf.group_advantages(rewards, 4)
    # group 1: mean 0.25; unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert std.tolist() == pytest.approx([0.5, 0.0])
    expected = [0.75 / (0.5 + 1e-4)] + [-0.25 / (0.5 + 1e-4)] * 3 + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected)


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    # ratio ref/pi = 0.5: 0.5 - ln(0.5) - 1 = 0.19315; equal policies: 0
    assert rlhf.k3_kl(logp, ref).tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0])


def test_grpo_loss_value_and_gradient_by_hand():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -1.5, -0.1]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.0, 0.0], [-0.5, -2.0, -0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, beta = torch.tensor([1.0, -0.5]), 0.1
    loss, kl = rlhf.grpo_loss_sum(logp, ref, adv, mask, beta)

    def k3(lp, r):
        return math.exp(r - lp) - (r - lp) - 1
    kl0 = (k3(-1.0, -1.2) + k3(-2.0, -1.0)) / 2
    kl1 = (k3(-0.5, -0.5) + k3(-1.5, -2.0) + k3(-0.1, -0.3)) / 3
    # value: each completion's mean over its tokens of (-advantage + beta * k3), summed over completions
    assert float(loss.detach()) == pytest.approx((-1.0 + beta * kl0) + (0.5 + beta * kl1))
    assert kl.tolist() == pytest.approx([kl0, kl1])
    loss.backward()
    # d/dlogp = (-advantage + beta * (1 - exp(ref - logp))) / tokens; padding gets no gradient (not NaN)
    def grad(a, lp, r, n):
        return (-a + beta * (1 - math.exp(r - lp))) / n
    expected = [[grad(1.0, -1.0, -1.2, 2), grad(1.0, -2.0, -1.0, 2), 0.0],
                [grad(-0.5, -0.5, -0.5, 3), grad(-0.5, -1.5, -2.0, 3), grad(-0.5, -0.1, -0.3, 3)]]
    assert logp.grad.tolist()[0] == pytest.approx(expected[0])
    assert logp.grad.tolist()[1] == pytest.approx(expected[1])


def test_no_kl_term_without_a_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, kl = rlhf.grpo_loss_sum(logp, None, torch.tensor([2.0]), torch.tensor([[1, 1]]), 0.0)
    assert kl is None and float(loss) == pytest.approx(-2.0)


def test_through_first_stop():
    tokens = torch.tensor([[5, 6, 2, 2], [2, 7, 2, 9], [5, 6, 7, 8]])
    assert rlhf.through_first_stop(tokens, [2]).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_completion_logps_match_unpadded_rows(tiny, one_torch_thread):
    """Left padding and position ids: each row's log-probs equal those of the row run alone."""
    model, tok = tiny
    torch.manual_seed(0)
    prompts = [tok("user billing", add_special_tokens=False)["input_ids"],
               tok("Please reset my password, I cannot log in", add_special_tokens=False)["input_ids"]]
    rollout = rlhf.sample_completions(model, prompts, group_size=2, max_new_tokens=5, temperature=0.7,
                                      pad_id=tok.pad_token_id, stops=[tok.eos_token_id])
    with torch.no_grad():
        batched = rlhf.completion_logps(model, rollout, 0.7)
    for r in range(4):
        prompt = prompts[r // 2]
        new = rollout.completion[r][rollout.completion_mask[r].bool()]
        ids = torch.tensor([prompt + new.tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / 0.7
        alone = torch.log_softmax(logits, -1).gather(1, new[:, None])[:, 0]
        assert batched[r, :len(new)].tolist() == pytest.approx(alone.tolist(), abs=1e-4)


# --- whole runs on the tiny model --------------------------------------------------------------------


def _run_cfg(tiny_model_dir, tmp_path, steps: int, **extra) -> dict:
    rows = [{"prompt": r["text"]} for r in toy_rows(40, 1)]
    train = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "rw.py").write_text(DIGITS)
    cfg = {"method": "rlhf", "output_dir": str(tmp_path / "runs"), "model": {"base": str(tiny_model_dir)},
           "data": {"train": str(train), "max_seq_len": 128, "validation_fraction": 0.2},
           "train": {"max_steps": steps, "learning_rate": 1e-2, "log_every": 1, "warmup_ratio": 0.0, "threads": 1},
           "rlhf": {"reward": f"{tmp_path / 'rw.py'}:digits", "max_new_tokens": 8, "group_size": 4,
                    "prompts_per_batch": 2},
           "eval": {"max_new_tokens": 8}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_held_out_reward(tiny_model_dir, tmp_path, one_torch_thread):
    out = run_training(parse_config(_run_cfg(tiny_model_dir, tmp_path, 40)), show_progress=False)
    ev = out.summary["eval"]
    assert ev["primary"] == "mean_reward"
    assert ev["tuned"]["mean_reward"] > ev["base"]["mean_reward"] + 0.3, ev
    rows = [r for r in _metrics(out.run_dir) if r["split"] == "train"]
    assert len(rows) == 40
    for r in rows:
        assert {"reward", "reward_std", "kl", "completion_length", "flat_groups"} <= set(r)
        assert 0 < r["completion_length"] <= 8 and r["kl"] >= 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from the start: policy = reference
    assert rows[-1]["kl"] > 1e-3  # and it moves away from it
    tuned = json.loads((out.run_dir / "eval_tuned.json").read_text())
    assert {"prompt", "reference", "output", "reward"} <= set(tuned["examples"][0])
    assert (out.run_dir / "report.md").is_file()


def test_full_weights_keep_a_frozen_reference(tiny_model_dir, tmp_path, one_torch_thread):
    cfg = _run_cfg(tiny_model_dir, tmp_path, 3, adapter="full", eval={"enabled": False})
    out = run_training(parse_config(cfg), show_progress=False)
    rows = [r for r in _metrics(out.run_dir) if r["split"] == "train"]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0


def test_resume_is_exact(tiny_model_dir, tmp_path, one_torch_thread):
    """Completions are sampled with torch's RNG, which checkpoints save: a run resumed from step 3 samples
    the same completions, logs the same rewards and ends with bit-identical weights."""
    cfg = _run_cfg(tiny_model_dir, tmp_path, 6, name="resumable", train={"save_every": 3, "keep_checkpoints": 3},
                   eval={"enabled": False})
    out = run_training(parse_config(cfg), show_progress=False)
    final = out.run_dir / "final" / "adapter_model.safetensors"
    expected, first = load_file(str(final)), _metrics(out.run_dir)
    shutil.rmtree(out.run_dir / "checkpoints" / "step-000006")
    shutil.rmtree(out.run_dir / "final")
    run_training(parse_config(cfg), resume=True, show_progress=False)
    resumed = load_file(str(final))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    again = _metrics(out.run_dir)[len(first):]
    assert [r["step"] for r in again] == [4, 5, 6]
    for a, b in zip(first[3:6], again):
        assert (a["reward"], a["kl"], a["loss"], a["completion_length"]) == (b["reward"], b["kl"], b["loss"],
                                                                           b["completion_length"])


def test_a_reward_model_run_scores_the_completions(tiny_model_dir, tmp_path, one_torch_thread):
    """rlhf.reward = a `method: reward` run: its scorer sees the whole prompt conversation and each answer."""
    from hone.methods.reward import load_scorer as load_reward_model

    pairs = [{"prompt": f"question {i}", "chosen": "thanks a lot", "rejected": "no"} for i in range(12)]
    reward_cfg = {"method": "reward", "name": "rm", "output_dir": str(tmp_path / "runs"),
                  "model": {"base": str(tiny_model_dir)},
                  "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "max_seq_len": 64},
                  "train": {"max_steps": 2, "threads": 1, "precision": "fp32"}, "eval": {"enabled": False}}
    rm_dir = run_training(parse_config(reward_cfg), show_progress=False).run_dir
    cfg = _run_cfg(tiny_model_dir, tmp_path, 2, rlhf={"reward": str(rm_dir)}, train={"precision": "fp32"})
    out = run_training(parse_config(cfg), show_progress=False)
    rows = [r for r in _metrics(out.run_dir) if r["split"] == "train"]
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    tuned = json.loads((out.run_dir / "eval_tuned.json").read_text())
    assert tuned["primary"] == "mean_reward"
    scorer = load_reward_model(rm_dir, precision="fp32")
    examples = tuned["examples"]
    again = scorer.score([[{"role": "user", "content": e["prompt"]}] for e in examples], [e["output"] for e in examples])
    assert [e["reward"] for e in examples] == pytest.approx(again, abs=1e-5)
