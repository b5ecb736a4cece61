"""method: contrastive. The InfoNCE loss, the false-negative mask and the retrieval metrics against hand
computations; a tiny BERT-like encoder (built here, 2 layers, 32 dims) learning a toy pairing task through
`hone train` with exact resume; adapter runs; what the saved encoder loads as; bad data and bad settings."""

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
from hone.methods import contrastive as C
from hone.models.load import ModelError
from hone.train.prepare import DataProblems
from hone.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The toy task: a query names a word, its positive names that word's partner. Nothing in the tokens links the
# two, so a random encoder retrieves at chance and only training can learn the pairing.
SOURCE = ["customer", "brown", "fox", "jumps", "lazy", "dog", "order", "package", "password", "account",
          "charged", "invoice", "billing", "app", "crashes", "checkout", "cancel", "subscription", "refund",
          "capital"]
PARTNER = ["red", "green", "blue", "yes", "no", "true", "false", "zero", "one", "two", "three", "four", "five",
           "six", "seven", "eight", "nine", "ten", "hundred", "thousand"]
FILLER = ["please help", "hello team", "thanks a lot", "good morning", "this is urgent", "any news"]


def toy_pairs(fillers: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"query": f"{f} {s}", "positive": f"{p} {rng.choice(FILLER)}"}
            for f in fillers for s, p in zip(SOURCE, PARTNER)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from hone.models.tiny import write_tiny_encoder

    return write_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert", layers=2, max_positions=64)


@pytest.fixture
def toy_config(tiny_encoder_dir, tmp_path) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(FILLER[:5], 1))
    held = write_jsonl(tmp_path / "held.jsonl", toy_pairs(FILLER[5:], 2))
    return {"output_dir": str(tmp_path / "runs"), "method": "contrastive",
            "model": {"base": str(tiny_encoder_dir)},
            "data": {"train": str(train), "validation": str(held)},
            "contrastive": {"batch_size": 10, "max_seq_len": 24},
            "train": {"max_steps": 6, "learning_rate": 3e-3, "log_every": 1, "save_every": 3, "eval_every": 3,
                      "warmup_ratio": 0.0, "threads": 1},
            "eval": {"enabled": False}}


def run(raw: dict, **kw):
    return run_training(parse_config(raw), show_progress=False, **kw)


# --- pure pieces against hand computations ------------------------------------------------------------


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # two positives, then one hard negative
    loss, correct = C.info_nce_sum(q, p, temperature=0.5)
    # logits = cos / 0.5: row 0 = [2, 0, 1.2], row 1 = [0, 2, 1.6]; targets are the diagonal
    want = (-2 + math.log(math.e ** 2 + 1 + math.e ** 1.2)) + (-2 + math.log(1 + math.e ** 2 + math.e ** 1.6))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert correct.item() == 2
    masked, _ = C.info_nce_sum(q, p, 0.5, exclude=torch.tensor([[False, False, True], [False, False, False]]))
    want_masked = (-2 + math.log(math.e ** 2 + 1)) + (-2 + math.log(1 + math.e ** 2 + math.e ** 1.6))
    assert masked.item() == pytest.approx(want_masked, rel=1e-6)
    # a row whose positive is not its best column: counted wrong, and its loss is above log(columns)
    bad, correct = C.info_nce_sum(q.flip(0), p[:2], 1.0)
    assert correct.item() == 0 and bad.item() == pytest.approx(2 * (-0 + math.log(1 + math.e)), rel=1e-6)


def test_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert C.pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert C.pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]


def test_exclusion_mask_keeps_correct_answers_out_of_the_negatives():
    # pairs (query key, positive key): (0, 10), (0, 11) share a query; (2, 10) repeats a positive;
    # (3, 0): its positive is the text of pair 0's query. Columns: the four positives, then a negative 20.
    pairs = [C.KeyPair(0, 10), C.KeyPair(0, 11), C.KeyPair(2, 10), C.KeyPair(3, 0, 20)]
    columns = [10, 11, 10, 0, 20]
    mask = C.exclusion_mask([p.query for p in pairs], columns, [0, 1, 2, 3], C.answers_by_query(pairs))
    assert mask.tolist() == [
        [False, True, True, True, False],    # 11 answers query 0 too; 10 is its own text; 0 is the query itself
        [True, False, True, True, False],
        [True, False, False, False, False],  # column 0 holds the same text as its own positive
        [False, False, False, False, False],
    ]


def test_retrieval_metrics_match_hand_computation():
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.0],     # target 0: rank 1
                           [0.5, 0.4, 0.1, 0.0],     # target 1: rank 2
                           [0.9, 0.8, 0.7, 0.1]])    # target 3: rank 4
    got = C.retrieval_metrics(scores, torch.tensor([0, 1, 3]))
    assert got["recall_at_1"] == pytest.approx(1 / 3)
    assert got["recall_at_5"] == pytest.approx(1.0)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    scores[1, 0] = float("-inf")  # a masked column no longer outranks the target
    assert C.retrieval_metrics(scores, torch.tensor([0, 1, 3]))["mrr"] == pytest.approx((1 + 1 + 1 / 4) / 3)
    wide = torch.arange(7.0).flip(0).repeat(2, 1)  # 7 columns, targets at rank 6 and 1
    assert C.retrieval_metrics(wide, torch.tensor([5, 0]))["recall_at_5"] == pytest.approx(0.5)


def test_epoch_plan_is_seeded_covers_every_pair_and_never_leaves_a_lone_pair():
    a, b = C.plan_epoch(23, 5, seed=3, epoch=1), C.plan_epoch(23, 5, seed=3, epoch=1)
    assert a == b and a != C.plan_epoch(23, 5, seed=3, epoch=2)
    assert sorted(i for batch in a for i in batch) == list(range(23))
    assert [len(x) for x in a] == [5, 5, 5, 5, 3]
    assert [len(x) for x in C.plan_epoch(21, 5, 0, 0)] == [5, 5, 5, 6]


# --- a tiny encoder through `hone train` ----------------------------------------------------------------


def test_tiny_encoder_learns_the_pairing_and_saves_a_sentence_encoder(toy_config):
    toy_config["train"].update(max_steps=100, learning_rate=1e-2, log_every=10, save_every=1000, eval_every=1000)
    toy_config["contrastive"]["batch_size"] = 20
    toy_config["eval"] = {"enabled": True}
    out = run(toy_config)
    ev = out.summary["eval"]
    assert ev["primary"] == "recall_at_1" and ev["n"] == 20
    assert ev["tuned"]["recall_at_1"] >= ev["base"]["recall_at_1"] + 0.5, ev  # measured: 5% -> 90%
    assert ev["tuned"]["mrr"] > ev["base"]["mrr"], ev
    rows = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert 0 <= train[-1]["in_batch_accuracy"] <= 1 and train[-1]["loss"] < train[0]["loss"]
    final = out.run_dir / "final"
    for name in ("model.safetensors", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (final / name).is_file(), name
    # load_encoder gives the vectors the evaluation used: its recall@1 on the held-out pairs is the report's
    pairs = [json.loads(x) for x in Path(toy_config["data"]["validation"]).read_text().splitlines()]
    enc = C.load_encoder(out.run_dir)
    q, d = enc.encode([p["query"] for p in pairs]), enc.encode([p["positive"] for p in pairs])
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(q)))
    assert C.retrieval_metrics(q @ d.T, torch.arange(len(pairs)))["recall_at_1"] == ev["tuned"]["recall_at_1"]
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(final), device="cpu").encode([p["query"] for p in pairs],
                                                                     convert_to_tensor=True)
    torch.testing.assert_close(theirs, q, atol=1e-5, rtol=1e-4)


def test_resume_after_a_crash_gives_the_same_weights(toy_config):
    first = run(toy_config).run_dir
    expected = load_file(str(first / "final" / "model.safetensors"))
    # as if the process died after step 3's checkpoint: later files never written
    shutil.rmtree(first / "checkpoints" / "step-000006")
    shutil.rmtree(first / "final")
    resumed = run(toy_config, resume=True).run_dir
    assert resumed == first and "resumed from step-000003" in (first / "events.jsonl").read_text()
    got = load_file(str(resumed / "final" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    tiny = load_file(str(Path(toy_config["model"]["base"]) / "model.safetensors"))
    changed = sum(not torch.equal(tiny[k], expected[k]) for k in tiny if k in expected)
    assert changed > 10  # the comparison is between trained weights (dropout was on: RNG restored too)


def test_lora_adapter_run_saves_an_adapter_that_load_encoder_reads(toy_config):
    toy_config["adapter"] = "lora"
    toy_config["eval"] = {"enabled": True}
    out = run(toy_config)
    final = out.run_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / C.NOTE_FILE).is_file()
    note = json.loads((final / C.NOTE_FILE).read_text())
    assert note["base"] == str(Path(toy_config["model"]["base"]).resolve()) and note["pooling"] == "mean"
    assert out.summary["training"]["trainable_params"] < out.summary["training"]["total_params"] / 2
    pairs = [json.loads(x) for x in Path(toy_config["data"]["validation"]).read_text().splitlines()]
    enc = C.load_encoder(final)
    q, d = enc.encode([p["query"] for p in pairs]), enc.encode([p["positive"] for p in pairs])
    tuned = json.loads((out.run_dir / "eval_tuned.json").read_text())["metrics"]
    assert C.retrieval_metrics(q @ d.T, torch.arange(len(pairs)))["mrr"] == pytest.approx(tuned["mrr"], abs=1e-6)


def test_grad_accum_is_warned_about(toy_config):
    toy_config["train"].update(max_steps=1, grad_accum=2)
    out = run(toy_config)
    events = (out.run_dir / "events.jsonl").read_text()
    assert "grad_accum=2" in events and "contrastive.batch_size" in events


# --- errors before any model loads ------------------------------------------------------------------------


def test_wrong_data_names_the_line_and_the_fields(toy_config, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"query": "a", "positive": "b"},
        {"question": "where is my card", "answer": "it ships in a week", "hard_negative": "reset your pin"},
        {"query": "only a query"},
        {"anchor": "x", "positive": "y", "negative": "y"},
        {"prompt": "p", "chosen": "c", "rejected": "r"},
    ])
    toy_config["data"]["train"] = str(bad)
    with pytest.raises(DataProblems) as e:
        C.validate(parse_config(toy_config))
    msg = str(e.value)
    assert f"{bad}:3:" in msg and f"{bad}:5:" in msg and f"{bad}:4:" in msg
    assert "'query' and 'positive'" in msg and "missing 'positive' or 'answer'" in msg
    assert "same text as the positive" in msg
    assert ":1:" not in msg and ":2:" not in msg  # the other accepted shapes parse
    toy_config["data"]["skip_bad_lines"] = True
    data = C.validate(parse_config(toy_config))
    assert [p.negative for p in data.train] == [None, "reset your pin"] and len(data.problems) == 3


def test_bad_settings_stop_before_loading(toy_config):
    toy_config["adapter"] = "prefix"
    with pytest.raises(ConfigError, match="full weights or a lora, dora or ia3"):
        C.validate(parse_config(toy_config))
    toy_config["adapter"] = None
    toy_config["model"]["base"] = "some-org/some-model"
    with pytest.raises(ModelError, match="needs an encoder"):
        C.validate(parse_config(toy_config))


def test_default_base_means_minilm_for_this_method(toy_config):
    pytest.importorskip(C.MINILM_PACKAGE)
    assert C.encoder_source("smollm2-135m-instruct") == C.minilm_dir() == C.encoder_source("all-minilm-l6-v2")
    assert C.read_pooling(C.minilm_dir()) == "mean"


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers():
    pytest.importorskip(C.MINILM_PACKAGE)
    st = pytest.importorskip("sentence_transformers")
    texts = ["Where is my new card?", "My card has not arrived yet.", "How do I change my PIN?"]
    ours = C.load_encoder("all-minilm-l6-v2").encode(texts)
    theirs = st.SentenceTransformer(str(C.minilm_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    sims = ours @ ours.T
    assert sims[0, 1] > sims[0, 2]  # the card questions are closer to each other than to the PIN one
