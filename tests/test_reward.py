"""The reward method on the tiny model: Bradley-Terry loss by hand, learning a keyword preference, final/ read
back by load_scorer with the in-memory scores, exact resume, and data errors before any model loads."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hone.config import ConfigError, parse_config
from hone.methods.pairs import Pair, tokenize_pair
from hone.methods.reward import (bradley_terry_loss_sum, collate_scored, load_score_model, load_scorer, pack_pairs,
                                 scored_ids, sequence_scores, set_distinct_pad)
from hone.records import Message
from hone.train.prepare import DataProblems
from hone.train.run import run_training

WORDS = ["order", "package", "invoice", "account", "login", "billing", "refund", "shipping", "quick", "brown",
         "fox", "lazy", "dog", "app", "checkout", "button", "payment", "courier", "delivery", "team"]
KEYWORD = "thanks"


def keyword_pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers say 'thanks' somewhere among random words; rejected ones are other random words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        chosen.insert(rng.randint(0, len(chosen)), KEYWORD)
        rejected = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        rows.append({"prompt": f"question {i}: {rng.choice(WORDS)} {rng.choice(WORDS)}?",
                     "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def reward_config(tiny_model_dir, tmp_path) -> dict:
    train = write_jsonl(tmp_path / "pairs-train.jsonl", keyword_pairs(96, 1))
    held = write_jsonl(tmp_path / "pairs-held.jsonl", keyword_pairs(40, 2))
    return {"output_dir": str(tmp_path / "runs"), "method": "reward", "model": {"base": str(tiny_model_dir)},
            "data": {"train": str(train), "validation": str(held), "max_seq_len": 64},
            "train": {"max_steps": 30, "learning_rate": 3e-3, "batch_tokens": 1024, "log_every": 5,
                      "save_every": 10, "eval_every": 15, "warmup_ratio": 0.0, "threads": 1, "precision": "fp32"},
            "eval": {"batch_size": 16}}


def run(cfg: dict, **kw):
    return run_training(parse_config(cfg), show_progress=False, **kw)


def evals(run_dir: Path) -> tuple[dict, dict]:
    return (json.loads((run_dir / "eval_base.json").read_text()),
            json.loads((run_dir / "eval_tuned.json").read_text()))


# --- the loss ------------------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    loss, stats = bradley_terry_loss_sum(chosen, rejected)
    # margins 1, 0, -1: log(1 + e^-1) + log 2 + log(1 + e^1)
    expected = math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(stats["accuracy"]) == 1.5  # one right, one tie (half), one wrong
    assert float(stats["margin"]) == 0.0
    assert float(stats["chosen_score"]) == 3.0 and float(stats["rejected_score"]) == 3.0


def test_bradley_terry_loss_is_stable_and_pushes_the_right_way():
    chosen = torch.tensor([-100.0, 100.0], requires_grad=True)
    rejected = torch.tensor([100.0, -100.0], requires_grad=True)
    loss, _ = bradley_terry_loss_sum(chosen, rejected)
    assert float(loss.detach()) == pytest.approx(200.0, rel=1e-6)  # a badly wrong pair costs its margin, not inf
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)  # descending raises chosen
    assert rejected.grad.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


# --- data and batches ---------------------------------------------------------------------------------


def test_scored_ids_match_training_sequences_including_truncation(tiny):
    _, tok = tiny
    pair = Pair((Message("user", "where is my package " * 6),), "thanks a lot " * 8, "no")
    for limits in ((512, 1024), (8, 40), (8, 12)):
        t = tokenize_pair(tok, pair, *limits)
        assert scored_ids(tok, pair.prompt, pair.chosen, *limits) == (t.prompt_ids, t.chosen_ids)
        assert scored_ids(tok, pair.prompt, pair.rejected, *limits) == (t.prompt_ids, t.rejected_ids)
    _, answer = scored_ids(tok, pair.prompt, pair.chosen, 512, 1024)
    assert tok.convert_ids_to_tokens(answer[-1]) == "<|im_end|>"  # the score is read at end-of-turn


def test_pack_pairs_respects_the_token_budget():
    class P:
        def __init__(self, n):
            self.prompt_ids, self.chosen_ids, self.rejected_ids = [1] * n, [2] * 2, [3]

    pairs = [P(n) for n in (10, 10, 10, 30, 100)]  # one prompt row + two answer rows of 2: 14, 14, 14, 34, 104
    batches = pack_pairs(list(range(5)), pairs, budget=50)
    assert batches == [[0, 1, 2], [3], [4]]  # 3*14=42 fits; adding 34 would not; 104 alone exceeds


def test_collate_pads_right_and_maps_answers_to_prompts():
    b = collate_scored([[5, 6, 7], [8]], [[1], [2, 3], [4]], [0, 1, 0], pad_id=0, target_weight=1)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and b.prompt_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.answer_ids.tolist() == [[1, 0], [2, 3], [4, 0]] and b.answer_prompt.tolist() == [0, 1, 0]
    assert b.real_tokens == 8 and b.target_weight == 1


def _full_sequence_scores(model, rows: list[list[int]]) -> torch.Tensor:
    """The plain path: each whole sequence on its own through the model's transformer, head at the end."""
    backbone = model.model
    return torch.cat([model.score(backbone(input_ids=torch.tensor([r])).last_hidden_state[:, -1]) for r in rows])[:, 0]


def test_shared_prompt_scores_and_gradients_equal_full_sequences(tiny_model_dir, one_torch_thread):
    torch.manual_seed(0)
    model = load_score_model(str(tiny_model_dir)).model
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    answers = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29], [30, 31]]
    owner = [0, 0, 1, 2, 2]  # prompts 0 and 2 are shared by two answers
    batch = collate_scored(prompts, answers, owner, pad_id=0)
    shared = sequence_scores(model, batch)
    full = _full_sequence_scores(model, [prompts[o] + a for o, a in zip(owner, answers)])
    assert shared.tolist() == pytest.approx(full.tolist(), abs=1e-5)
    weights = torch.arange(1.0, 6.0)  # any scalar of the scores: gradients must match through the cache
    grads = []
    for scores in (shared, full):
        model.zero_grad()
        (scores * weights).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "score.weight" in grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_pad_token_is_made_distinct_from_end_of_turn(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = "<|im_end|>"  # as SmolLM2 ships: pad is its end-of-turn token
    config = AutoConfig.from_pretrained(tiny_model_dir)
    set_distinct_pad(tok, config)
    assert tok.pad_token != "<|im_end|>" and config.pad_token_id == tok.pad_token_id


# --- errors before any model loads ---------------------------------------------------------------------


def test_wrong_shaped_data_is_refused_before_the_model_loads(reward_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n'
                   '{"text": "hello", "label": "x"}\n')
    reward_config["data"] = {"train": str(bad), "validation": str(bad)}
    reward_config["model"]["base"] = str(tmp_path / "no-such-model")  # loading it would fail differently
    with pytest.raises(DataProblems) as e:
        run(reward_config)
    message = str(e.value)
    assert f"{bad}:2" in message and f"{bad}:3" in message and "'rejected'" in message
    assert "needs 'prompt', 'chosen' and 'rejected'" in message


@pytest.mark.parametrize("adapter", ["prefix", "qlora"])
def test_unsupported_adapters_are_refused(reward_config, adapter):
    reward_config["adapter"] = adapter
    with pytest.raises(ConfigError, match=f"not '{adapter}'"):
        run(reward_config)


# --- end to end on the tiny model -----------------------------------------------------------------------


def test_reward_model_learns_a_keyword_preference(reward_config, one_torch_thread):
    out = run(reward_config)
    base, tuned = evals(out.run_dir)
    b, t = base["metrics"]["pairwise_accuracy"], tuned["metrics"]["pairwise_accuracy"]
    assert base["primary"] == "pairwise_accuracy" and tuned["n"] == 40
    assert 0.2 <= b <= 0.8, b  # a fresh head is about chance
    assert t >= 0.9 and t - b >= 0.25, (b, t)
    assert tuned["metrics"]["mean_margin"] > 0.5
    rows = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "validation"]
    assert {"accuracy", "margin", "chosen_score", "rejected_score"} <= set(val[-1])
    assert val[-1]["loss"] < val[0]["loss"] or val[-1]["loss"] < math.log(2)
    assert (out.run_dir / "final" / "adapter_config.json").is_file()
    adapter = load_file(str(out.run_dir / "final" / "adapter_model.safetensors"))
    assert any("score" in k for k in adapter), "the score head must be saved with the adapter"
    # The scorer reads the run back and scores what the in-memory model scored after training.
    scorer = load_scorer(out.run_dir)
    held = [json.loads(x) for x in Path(reward_config["data"]["validation"]).read_text().splitlines()]
    chosen = scorer.score([r["prompt"] for r in held], [r["chosen"] for r in held])
    rejected = scorer.score([[{"role": "user", "content": r["prompt"]}] for r in held], [r["rejected"] for r in held])
    assert sum(chosen) / len(chosen) == pytest.approx(tuned["metrics"]["mean_chosen_score"], abs=1e-5)
    assert sum(rejected) / len(rejected) == pytest.approx(tuned["metrics"]["mean_rejected_score"], abs=1e-5)
    for c, r, example in zip(chosen, rejected, tuned["examples"]):
        assert example["output"] == f"chosen {c:+.3f} vs rejected {r:+.3f}"


def test_full_weights_round_trip_and_plain_transformers_agree(reward_config, one_torch_thread):
    from transformers import AutoModelForSequenceClassification

    reward_config["adapter"] = "full"
    reward_config["train"].update(max_steps=4, learning_rate=1e-3)
    out = run(reward_config)
    scorer = load_scorer(out.run_dir)
    prompts, answers = ["where is my package?", "hello team"], ["thanks, it ships today", "no"]
    scores = scorer.score(prompts, answers)
    assert scorer.score(prompts[:1], answers[:1]) == pytest.approx(scores[:1], abs=1e-5)  # batching is neutral
    group = ["thanks, it ships today", "no", "the courier has it", "thanks"]  # rlhf: completions of one prompt
    together = scorer.score([prompts[0]] * 4, group)
    assert together == pytest.approx([scorer.score(prompts[:1], [g])[0] for g in group], abs=1e-5)
    tuned = json.loads((out.run_dir / "eval_tuned.json").read_text())["metrics"]
    held = [json.loads(x) for x in Path(reward_config["data"]["validation"]).read_text().splitlines()]
    again = scorer.score([r["prompt"] for r in held], [r["chosen"] for r in held])
    assert sum(again) / len(again) == pytest.approx(tuned["mean_chosen_score"], abs=1e-5)
    # final/ is an ordinary transformers sequence classifier: with right padding its own pooling (last
    # non-pad token) lands on the same end-of-turn token.
    plain = AutoModelForSequenceClassification.from_pretrained(out.run_dir / "final").eval()
    seqs = [sum(scored_ids(scorer.tokenizer, (Message("user", p),), a, 512, 64), []) for p, a in zip(prompts, answers)]
    ids = torch.full((2, max(map(len, seqs))), scorer.tokenizer.pad_token_id)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        logits = plain(input_ids=ids).logits[:, 0]
    assert logits.tolist() == pytest.approx(scores, abs=1e-5)


@pytest.mark.parametrize("adapter", ["dora", "ia3"])
def test_other_adapters_train_and_save_the_head(reward_config, adapter, one_torch_thread):
    reward_config["adapter"] = adapter
    reward_config["train"].update(max_steps=2)
    reward_config["eval"]["enabled"] = False
    out = run(reward_config)
    saved = load_file(str(out.run_dir / "final" / "adapter_model.safetensors"))
    assert any("score" in k for k in saved) and len(saved) > 1
    assert len(load_scorer(out.run_dir).score(["hello team"], ["thanks"])) == 1


def test_resume_reaches_the_same_weights(reward_config, tmp_path, one_torch_thread):
    reward_config["train"].update(max_steps=8, save_every=2, eval_every=8)
    reward_config["name"] = "rm"
    reference = run(dict(reward_config, output_dir=str(tmp_path / "reference"))).run_dir
    crashed = run(reward_config).run_dir
    # As if killed after step 6: only the checkpoints up to there, no final weights, no tuned evaluation.
    shutil.rmtree(crashed / "checkpoints" / "step-000008")
    shutil.rmtree(crashed / "final")
    (crashed / "eval_tuned.json").unlink()
    out = run(reward_config, resume=True)
    assert out.run_dir == crashed
    expected = load_file(str(reference / "final" / "adapter_model.safetensors"))
    got = load_file(str(crashed / "final" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_sft_run_as_base_and_load_scorer_refusals(tiny_config, reward_config, tmp_path, one_torch_thread):
    from hone.models.load import ModelError

    with pytest.raises(ModelError, match="config.yaml"):
        load_scorer(tmp_path)
    sft = run(tiny_config).run_dir  # an SFT (LoRA) run
    with pytest.raises(ModelError, match="not a reward model"):
        load_scorer(sft)
    # The usual RLHF recipe: the reward model starts from the SFT model (its LoRA merged into the base).
    reward_config["model"]["base"] = str(sft)
    reward_config["train"].update(max_steps=2)
    out = run(reward_config)
    assert len(load_scorer(out.run_dir).score(["hello team"], ["thanks"])) == 1
